"""Sending jobs back to the queue: after an infrastructure failure, and when a worker died.

The :class:`Reaper` runs in every worker. A ``running`` job whose lease has expired (its worker
was killed, lost power, or hung) is moved to ``retrying``, which puts it back in its queue's pending
set for the dispatcher (:mod:`shared.scheduler`); the next attempt resumes from the job's newest checkpoint. The state change is a Redis transaction, so when
several reapers see the same dead job, exactly one requeues it.

A job whose worker is lost a second time fails instead (a "poison pill"): a job that keeps
killing its workers, most often by running them out of memory (the kernel's OOM killer sends
SIGKILL, which nothing can catch), would otherwise take down one worker per attempt.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared.exceptions import InvalidTransitionError, JobNotFoundError
from shared.jobs import JobStore
from shared.lease import JobLease
from shared.records import JobRecord, JobState
from shared.scheduler import wake
from shared.settings import Settings

logger = logging.getLogger(__name__)

#: Reason prefix of a requeue after a lost worker (counted to spot a poison pill).
WORKER_LOST = "worker lost"
#: A job whose worker is lost this many times fails as a job fault.
MAX_WORKER_LOSSES = 2


def worker_losses(record: JobRecord) -> int:
    """How many earlier attempts of the job ended with their worker lost (requeued by a reaper)."""
    return sum(
        1 for t in record.transitions if t.state is JobState.RETRYING and (t.reason or "").startswith(WORKER_LOST)
    )


def preemptions(record: JobRecord) -> int:
    """How many earlier attempts of the job were preempted (they are not its fault)."""
    return sum(1 for t in record.transitions if t.state is JobState.PREEMPTED)


def requeue(store: JobStore, job_id: str, *, reason: str, attempt: int, max_attempts: int | None) -> JobState:
    """Send a running job back to its queue's pending set, or fail it once ``max_attempts`` are used.

    ``max_attempts=None`` always requeues (a worker shutting down is not the job's fault). Attempts
    that ended preempted do not count against ``max_attempts``.

    ``attempt`` fences the change: it happens only if the job is still on that attempt.
    Returns the job's new state.

    Raises:
        InvalidTransitionError: the job moved on meanwhile (another worker or reaper acted).
    """
    if max_attempts is not None and attempt - preemptions(store.get(job_id)) >= max_attempts:
        store.transition(
            job_id, JobState.FAILED, reason=reason, expect_attempt=attempt,
            error=f"gave up after {attempt} attempt(s); last: {reason}",
        )
        return JobState.FAILED
    store.transition(job_id, JobState.RETRYING, reason=reason, expect_attempt=attempt, error=reason)  # now pending
    wake(store.redis)
    logger.warning("job %s: requeued after attempt %d: %s", job_id, attempt, reason)
    return JobState.RETRYING


class Reaper(threading.Thread):
    """Every ``reaper_interval_s`` seconds, requeue running jobs whose worker stopped heartbeating."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        super().__init__(name="trainq-reaper", daemon=True)
        self.store, self.settings = store, settings
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.settings.reaper_interval_s):
            try:
                self.reap_once()
            except redis.RedisError as exc:
                logger.warning("reaper: Redis unavailable (%s)", exc)
            except Exception:
                logger.exception("reaper: scan failed")

    def reap_once(self) -> list[str]:
        """One scan; returns the ids of jobs it requeued, failed or cancelled."""
        reaped = []
        for job_id in self.store.running_ids():
            if JobLease.is_held(self.store.redis, job_id):
                continue
            try:
                record = self.store.get(job_id)
            except JobNotFoundError:
                continue
            # A worker takes the lease right after entering `running`; give it the TTL to do so.
            if record.state is not JobState.RUNNING or time.time() - record.transitions[-1].at < self.settings.lease_ttl_s:
                continue
            reason = f"{WORKER_LOST}: {record.worker} sent no heartbeat for {self.settings.lease_ttl_s:g} s"
            try:
                if record.cancel_requested_at is not None:
                    self.store.transition(job_id, JobState.CANCELLED, reason=f"cancelled ({reason})", expect_attempt=record.attempts)
                elif worker_losses(record) + 1 >= MAX_WORKER_LOSSES:
                    self._fail_poison_pill(record, reason)
                else:
                    requeue(self.store, job_id, reason=reason, attempt=record.attempts, max_attempts=self.settings.max_attempts)
                reaped.append(job_id)
            except InvalidTransitionError:
                continue  # another reaper, or the worker itself, got there first
        return reaped

    def _fail_poison_pill(self, record: JobRecord, reason: str) -> None:
        losses = worker_losses(record) + 1
        times = "twice" if losses == 2 else f"{losses} times"
        error = (
            f"worker lost {times} while running this job (out of memory? the worker process was killed without "
            "a word, as the kernel's OOM killer does: lower batch_size, dataset.image_size or num_workers, or pick "
            f"a smaller model.arch); last: {reason}"
        )
        self.store.transition(record.id, JobState.FAILED, reason=f"worker lost {times}", expect_attempt=record.attempts, error=error)
        logger.error("job %s: failed: %s", record.id, error)

    def stop(self) -> None:
        """End the thread after the current scan."""
        self._stopped.set()
