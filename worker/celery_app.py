"""The worker's Celery app: the shared configuration plus what only a training worker needs.

``worker_pool = "solo"``: the job runs in the worker's main process, not in a daemonic pool child,
so a spec's DataLoader may start its own worker processes (``num_workers > 0``); a prefork child
would fail with "daemonic processes are not allowed to have children". One job at a time per
worker process; run one worker per GPU (``CUDA_VISIBLE_DEVICES``) to use several. torch is
imported once when the worker starts (``worker.tasks``), not per job. Workers also serve dry
runs (``worker.dryrun_task``) from ``DRY_RUN_QUEUE``: a worker started without ``-Q`` consumes
``default`` and ``dry-run``; with ``-Q`` name both (``-Q default,dry-run``) or a dedicated worker
serves ``-Q dry-run``.

Each worker also runs a reaper thread (requeues jobs whose worker died), and on a warm shutdown
(SIGTERM) its running job checkpoints and goes back to the queue.
"""

from __future__ import annotations

from celery import signals
from kombu import Exchange, Queue

from shared.queue import make_celery
from shared.settings import get_settings

_settings = get_settings()
app = make_celery(_settings)
app.conf.update(
    worker_pool="solo",
    worker_concurrency=1,
    include=["worker.tasks", "worker.dryrun_task"],
    # What a worker started without -Q consumes: jobs and dry runs. Declared as Celery declares a
    # queue a sender names (exchange and routing key = the name).
    task_queues=[Queue(name, Exchange(name), routing_key=name) for name in (_settings.default_queue, _settings.dry_run_queue)],
)


@signals.worker_ready.connect
def _start_reaper(**_: object) -> None:
    from shared.jobs import JobStore
    from worker.recovery import Reaper

    settings = get_settings()
    Reaper(JobStore.from_url(settings.redis_url), settings).start()


_presence = None


@signals.worker_ready.connect
def _start_presence(sender=None, **_: object) -> None:
    # The worker's status in Redis (GET /workers): name, queues, device, current job, counters.
    import redis

    from worker.presence import WorkerPresence

    global _presence
    settings = get_settings()
    queues = list(app.amqp.queues.consume_from or {settings.default_queue: None})
    name = getattr(sender, "hostname", None) or "worker"
    _presence = WorkerPresence(redis.Redis.from_url(settings.redis_url, socket_timeout=10), name, queues, settings)
    _presence.start()


@signals.worker_shutting_down.connect
def _checkpoint_on_shutdown(**_: object) -> None:
    from worker.heartbeat import worker_shutdown

    worker_shutdown.set()


@signals.worker_shutdown.connect
def _withdraw_presence(**_: object) -> None:
    if _presence is not None:
        _presence.stop()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _escape_controls_in_logs(logger, **_: object) -> None:
    # Names from data (S3 keys, class folders, CSV columns) reach log lines; a raw ESC or CR LF
    # there would recolour a terminal or forge a log line.
    from shared.sanitize import install_log_escaping

    install_log_escaping(logger)
