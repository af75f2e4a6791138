"""Sending jobs back to the queue: after an infrastructure failure, and when a worker died.

The :class:`Reaper` runs in every worker. A ``running`` job whose lease has expired (its worker
was killed, lost power, or hung) is moved to ``retrying`` and enqueued again; the next attempt
resumes from the job's newest checkpoint. The state change is a Redis transaction, so when
several reapers see the same dead job, exactly one requeues it.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery

from shared.exceptions import InvalidTransitionError, JobNotFoundError
from shared.jobs import JobState, JobStore
from shared.lease import JobLease
from shared.queue import enqueue
from shared.settings import Settings

logger = logging.getLogger(__name__)


def requeue(
    store: JobStore, celery: Celery, job_id: str, *, reason: str, attempt: int, max_attempts: int | None
) -> JobState:
    """Send a running job back to the queue, or fail it once ``max_attempts`` are used.

    ``max_attempts=None`` always requeues (a worker shutting down is not the job's fault).

    ``attempt`` fences the change: it happens only if the job is still on that attempt.
    Returns the job's new state.

    Raises:
        InvalidTransitionError: the job moved on meanwhile (another worker or reaper acted).
    """
    if max_attempts is not None and attempt >= max_attempts:
        store.transition(
            job_id, JobState.FAILED, reason=reason, expect_attempt=attempt,
            error=f"gave up after {attempt} attempt(s); last: {reason}",
        )
        return JobState.FAILED
    record = store.transition(job_id, JobState.RETRYING, reason=reason, expect_attempt=attempt, error=reason)
    enqueue(celery, job_id, record.queue)
    logger.warning("job %s: requeued after attempt %d: %s", job_id, attempt, reason)
    return JobState.RETRYING


class Reaper(threading.Thread):
    """Every ``reaper_interval_s`` seconds, requeue running jobs whose worker stopped heartbeating."""

    def __init__(self, store: JobStore, celery: Celery, settings: Settings) -> None:
        super().__init__(name="trainq-reaper", daemon=True)
        self.store, self.celery, self.settings = store, celery, settings
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
            reason = f"worker {record.worker} lost: no heartbeat for {self.settings.lease_ttl_s:g} s"
            try:
                if record.cancel_requested_at is not None:
                    self.store.transition(job_id, JobState.CANCELLED, reason=f"cancelled ({reason})", expect_attempt=record.attempts)
                else:
                    requeue(self.store, self.celery, job_id, reason=reason, attempt=record.attempts, max_attempts=self.settings.max_attempts)
                reaped.append(job_id)
            except InvalidTransitionError:
                continue  # another reaper, or the worker itself, got there first
        return reaped

    def stop(self) -> None:
        """End the thread after the current scan."""
        self._stopped.set()
