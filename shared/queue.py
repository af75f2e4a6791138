"""The Celery application shared by the API (which sends) and the worker (which runs).

Configured for long GPU jobs:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the
  job ends, so a worker that dies mid-job leaves it to be delivered again.
* ``worker_prefetch_multiplier = 1``: a busy worker does not hoard queued jobs.
* the Redis transport's ``visibility_timeout`` (``VISIBILITY_TIMEOUT_S``) is longer than the
  longest job, so a running job is not re-delivered to a second worker (celery/celery#5935).

Dry runs (``trainq.dry_run``, on ``DRY_RUN_QUEUE``) are the other task, queued fairly between
owners by :mod:`shared.dryruns`; the API waits for the reply on Redis, so it never imports torch.
"""

from __future__ import annotations

import redis
from celery import Celery

from shared.settings import Settings

#: The lists kombu's Redis transport keeps per queue: the queue's name for priority 0 and the name
#: plus ``\x06\x16<priority>`` for each other step of its default ``priority_steps`` (0, 3, 6, 9).
_PRIORITY_SEP, _PRIORITY_STEPS = "\x06\x16", (3, 6, 9)

#: Name of the training task: its only argument is the job id; the spec is read from the job record.
TRAIN_TASK = "trainq.train"


def _transport_options(visibility_timeout_s: int) -> dict[str, int]:
    # kombu sweeps for expired unacked messages every `interval * throttle` seconds (100 s by
    # default); keep the sweep a fraction of the timeout so a short timeout is honoured.
    interval = max(1, min(10, visibility_timeout_s // 4))
    throttle = max(1, min(10, visibility_timeout_s // (4 * interval)))
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": throttle,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url``, configured for long, late-acknowledged jobs."""
    app = Celery("trainq", broker=settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.default_queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings.visibility_timeout_s),
        worker_hijack_root_logger=False,
    )
    return app


def enqueue(app: Celery, job_id: str, queue: str) -> None:
    """Send the message that makes a worker on ``queue`` run job ``job_id``."""
    app.send_task(TRAIN_TASK, args=[job_id], queue=queue)


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in Celery's Redis lists for ``queue`` (not those a worker has taken)."""
    pipe = client.pipeline(transaction=False)
    for name in [queue, *(f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS)]:
        pipe.llen(name)
    return sum(pipe.execute())
