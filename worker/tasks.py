"""The Celery task: take the job, run the engine under a heartbeat, record the outcome.

Thin on purpose: all training is in :mod:`worker.training`. Exactly one worker trains a job at a
time: a delivery starts the job only by moving it from ``queued``/``retrying`` to ``running`` in a
Redis transaction; any other delivery (Redis re-delivering after ``visibility_timeout``, a
duplicate) is counted and skipped. Every later state change is fenced by the attempt number.

A failing job never crashes the worker. Only faults known to be transient (S3 or Redis
unreachable or throttled) send it back to the queue, up to ``MAX_ATTEMPTS``; job faults (bad data,
spec or weights) and unexpected errors fail it at once (:mod:`worker.faults` decides); a cancel or
time limit ends it after a checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from shared.access import settings_for_owner
from shared.exceptions import InvalidTransitionError, JobNotFoundError
from shared.jobs import JobStore
from shared.lease import JobLease
from shared.queue import TRAIN_TASK
from shared.records import STARTABLE_STATES, Artifacts, DatasetInfo, JobState, Progress
from shared.settings import Settings, get_settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.celery_app import app
from worker.faults import Fault, job_error
from worker.heartbeat import JobMonitor
from worker.joblog import JobLog
from worker.presence import STATS, MeteredStorage
from worker.recovery import requeue
from worker.training import CheckpointKind, StopReason, TrainingCallbacks, TrainingStopped, run_training
from worker.watchdog import STALLED, Hang, JobHung, Watchdog

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _redis_retry(action: Callable[[], T], what: str, deadline_s: float) -> T:
    """Run ``action``, retrying while Redis is unreachable (a restart) for up to ``deadline_s``."""
    started, backoff = time.monotonic(), 0.2
    while True:
        try:
            return action()
        except redis.ConnectionError as exc:
            if time.monotonic() - started > deadline_s:
                raise
            logger.warning("%s: Redis unavailable (%s); retrying", what, exc)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


class RecordCallbacks(TrainingCallbacks):
    """Writes the engine's reports into the job record and relays the monitor's stop flags.

    Progress writes are best effort: a Redis restart must not stop training.
    """

    def __init__(self, store: JobStore, job_id: str, monitor: JobMonitor, watchdog: Watchdog | None = None) -> None:
        self.store, self.job_id, self.monitor, self.watchdog = store, job_id, monitor, watchdog
        self.artifacts = Artifacts()

    def _write(self, **fields) -> None:
        try:
            self.store.update(self.job_id, **fields)
        except redis.RedisError as exc:
            logger.warning("job %s: record update skipped (%s)", self.job_id, exc)

    def on_start(self, *, device: str, dataset: DatasetInfo, tensorboard_uri: str, resumed_from: str | None) -> None:
        self.artifacts = self.store.get(self.job_id).artifacts  # keep earlier attempts' checkpoints
        self.artifacts.tensorboard = tensorboard_uri
        self._write(device=device, dataset=dataset, artifacts=self.artifacts, resumed_from=resumed_from)

    def on_progress(self, progress: Progress) -> None:
        if self.watchdog is not None:
            self.watchdog.progressed(progress)
        self._write(progress=progress)
        STATS.observe_progress(progress)

    def on_checkpoint(self, uri: str, kind: CheckpointKind) -> None:
        if kind is CheckpointKind.BEST:
            self.artifacts.best_checkpoint = uri
        elif uri not in self.artifacts.checkpoints:
            self.artifacts.checkpoints.append(uri)
        if kind is CheckpointKind.FINAL:
            self.artifacts.final_checkpoint = uri
        self._write(artifacts=self.artifacts)

    def on_checkpoint_deleted(self, uri: str) -> None:
        if uri in self.artifacts.checkpoints:
            self.artifacts.checkpoints.remove(uri)
            self._write(artifacts=self.artifacts)

    def stop_requested(self) -> StopReason | None:
        if self.watchdog is not None:
            self.watchdog.polled()  # the engine asks after each step, batch or file: it progresses
        return self.monitor.stop_requested()


def execute_job(job_id: str, store: JobStore, storage: Storage, settings: Settings, worker_name: str) -> JobState:
    """Run one delivery of job ``job_id``; return the job's state afterwards."""
    try:
        record = store.get(job_id)
    except JobNotFoundError:
        logger.error("job %s: no record; message dropped", job_id)
        return JobState.FAILED
    if record.state not in STARTABLE_STATES:
        store.count_duplicate_delivery(job_id)
        logger.warning("job %s: is %s; delivery skipped", job_id, record.state.value)
        return record.state
    try:
        record = store.transition(job_id, JobState.RUNNING, worker=worker_name)
    except InvalidTransitionError:
        store.count_duplicate_delivery(job_id)
        logger.warning("job %s: taken by another worker; delivery skipped", job_id)
        return store.get(job_id).state
    attempt = record.attempts
    lease = JobLease(store.redis, job_id, settings.lease_ttl_s, owner=worker_name)
    if not lease.acquire():  # cannot happen while reapers only requeue jobs with no lease
        logger.warning("job %s: another lease exists; this attempt will stop at its first heartbeat", job_id)
    monitor = JobMonitor(store, lease, job_id, settings.cancel_poll_interval_s, settings.lease_ttl_s)
    monitor.start()
    job_log = _start_job_log(job_id, attempt, worker_name, storage, settings)
    STATS.job_started(job_id)
    logger.info("job %s: attempt %d started on %s", job_id, attempt, worker_name)

    def finish(state: JobState, **fields) -> JobState:
        try:
            _redis_retry(lambda: store.transition(job_id, state, expect_attempt=attempt, **fields), f"job {job_id}", settings.lease_ttl_s)
        except InvalidTransitionError as exc:
            logger.error("job %s: outcome %s not recorded: %s", job_id, state.value, exc)
            return store.get(job_id).state
        return state

    limit = record.spec.time_limit_s(settings.max_runtime_s)

    def end_hung(hang: Hang) -> JobState:
        return _end_hung(hang, finish, lambda reason, retries: _requeue(store, job_id, reason, attempt, retries),
                         limit, worker_name, settings)

    watchdog = Watchdog(
        job_id, monitor.stop_requested, max_runtime_s=limit, stop_timeout_s=settings.stop_timeout_s,
        stall_timeout_s=settings.stall_timeout_s, on_abandon=end_hung,
    )
    try:
        spec = JobSpec.model_validate(record.spec.model_dump(mode="json"))
        callbacks = RecordCallbacks(store, job_id, monitor, watchdog)
        if record.cancel_requested_at is not None:
            return finish(JobState.CANCELLED, reason="cancelled before the attempt started")
        # The engine checks the spec's URIs again, against what this job's owner may read; the
        # watchdog ends it if it does not stop when it should (worker.watchdog).
        with watchdog.guard():
            result = run_training(job_id, spec, storage, settings_for_owner(settings, record.owner), callbacks)
    except JobHung as hung:
        logger.error("job %s: attempt %d: %s", job_id, attempt, hung)
        return end_hung(hung.hang or watchdog.hang)
    except TrainingStopped as stop:
        if stop.reason is StopReason.CANCELLED:
            return finish(JobState.CANCELLED, reason=f"cancelled by request at step {stop.step}")
        if stop.reason is StopReason.TIME_LIMIT:
            message = f"time limit: ran {stop.runtime_s:.1f} s, max_runtime_s is {limit:g}; checkpoint {stop.checkpoint}"
            return finish(JobState.FAILED, reason="time limit", error=message)
        if stop.reason is StopReason.SHUTDOWN:
            return _requeue(store, job_id, f"worker {worker_name} shut down at step {stop.step}", attempt, None)
        if stop.reason is StopReason.PREEMPTED:  # back to pending, keeping its age; not counted against MAX_ATTEMPTS
            return finish(JobState.PREEMPTED, reason=f"preempted at step {stop.step}")
        logger.error("job %s: %s; leaving the job to its new owner", job_id, stop)
        return store.get(job_id).state
    except Exception as exc:
        # Retry or fail: decided in one place (worker.faults); only known-transient faults retry.
        kind, message = job_error(exc, settings.data_cache_dir, settings.data_root)
        if kind is Fault.TRANSIENT:
            logger.warning("job %s: attempt %d: %s", job_id, attempt, message, exc_info=True)
            return _requeue(store, job_id, message, attempt, settings.max_attempts)
        if kind is Fault.JOB:
            logger.warning("job %s: failed: %s", job_id, message)
            return finish(JobState.FAILED, reason="job error", error=message)
        logger.exception("job %s: attempt %d: internal error", job_id, attempt)
        return finish(JobState.FAILED, reason="internal error", error=message)
    else:
        callbacks.artifacts.final_checkpoint = result.final_checkpoint
        summary = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items() if name.startswith("val_"))
        logger.info("job %s: succeeded: %s", job_id, summary or "no validation metrics")
        return finish(JobState.SUCCEEDED, artifacts=callbacks.artifacts, error=None)  # clear a retry's reason
    finally:
        monitor.stop()
        try:
            lease.release()
        except redis.RedisError:
            pass  # it expires by itself
        if job_log is not None:
            job_log.close()
        STATS.job_ended()


def _end_hung(
    hang: Hang, finish: Callable[..., JobState], requeue_job: Callable[[str, int | None], JobState],
    limit: float, worker_name: str, settings: Settings,
) -> JobState:
    """The outcome of an attempt the watchdog ended: what was due, and that the job hung.

    A cancel ends it cancelled, a time limit failed, a shutdown back in the queue (not the job's
    fault), a preemption back to pending (resuming from its last checkpoint), a stall (no progress,
    nothing asked) back in the queue up to ``max_attempts`` (a dead
    mount may come back; a deadlock in the job's code fails it after the last attempt).
    """
    if hang.cause is StopReason.CANCELLED:
        return finish(JobState.CANCELLED, reason=f"cancelled by request; {hang.describe()}")
    if hang.cause is StopReason.TIME_LIMIT:
        message = f"time limit: max_runtime_s is {limit:g}; {hang.describe()}, so no checkpoint was saved"
        return finish(JobState.FAILED, reason="time limit", error=message)
    if hang.cause is StopReason.SHUTDOWN:
        return requeue_job(f"worker {worker_name} shut down; {hang.describe()}", None)
    if hang.cause is StopReason.PREEMPTED:  # back to pending as any preempted job; resumes from its last checkpoint
        return finish(JobState.PREEMPTED, reason=f"preempted; {hang.describe()}")
    if hang.cause is StopReason.LEASE_LOST:  # another attempt may own the job: the requeue is fenced by this attempt
        return requeue_job(f"lease lost; {hang.describe()}", None)
    assert hang.cause == STALLED
    return requeue_job(f"hung: {hang.describe()} (stall_timeout_s is {settings.stall_timeout_s:g})", settings.max_attempts)


def _start_job_log(job_id: str, attempt: int, worker_name: str, storage: Storage, settings: Settings) -> JobLog | None:
    """Start capturing the attempt's log; None when it cannot (say, an unwritable cache): a log
    never fails a job, and a failure here, before the attempt's ``try``, would leave the job
    ``running`` with no one to finish it."""
    try:
        return JobLog.start(job_id, attempt, worker_name, storage, settings)
    except Exception:
        logger.exception("job %s: the attempt's log cannot be captured; training without it", job_id)
        return None


def _requeue(store: JobStore, job_id: str, reason: str, attempt: int, max_attempts: int | None) -> JobState:
    try:
        return requeue(store, job_id, reason=reason, attempt=attempt, max_attempts=max_attempts)
    except InvalidTransitionError as exc:
        logger.error("job %s: not requeued: %s", job_id, exc)
        return store.get(job_id).state


_store: JobStore | None = None
_storage: Storage | None = None


# A Redis blip before the job is taken (reading its record) must not drop the message: Celery
# sends it again with backoff. Once taken, execute_job handles Redis errors itself.
@app.task(
    name=TRAIN_TASK,
    bind=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=20,
)
def train(self, job_id: str) -> str:
    """Celery entry point (task ``trainq.train``): run one job by id; return its state."""
    global _store, _storage
    settings = get_settings()
    if _store is None:
        _store = JobStore.from_url(settings.redis_url)
        _storage = MeteredStorage(settings)
    state = execute_job(job_id, _store, _storage, settings, self.request.hostname or "worker")
    STATS.count_outcome(job_id, state)
    return state.value
