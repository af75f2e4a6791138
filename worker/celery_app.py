"""The worker's Celery app: the shared configuration plus what only a training worker needs.

``worker_pool = "solo"``: the job runs in the worker's main process, not in a daemonic pool child,
so a spec's DataLoader may start its own worker processes (``num_workers > 0``); a prefork child
would fail with "daemonic processes are not allowed to have children". One job at a time per
worker process; run one worker per GPU (``CUDA_VISIBLE_DEVICES``) to use several. torch is
imported once when the worker starts (``worker.tasks``), not per job.
"""

from __future__ import annotations

from shared.queue import make_celery
from shared.settings import get_settings

app = make_celery(get_settings())
app.conf.update(
    worker_pool="solo",
    worker_concurrency=1,
    include=["worker.tasks"],
)
