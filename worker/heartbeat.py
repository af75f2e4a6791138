"""The heartbeat of a running job: renews its lease and relays cancel and preemption requests to the engine.

One thread per running job. The engine asks :meth:`JobMonitor.stop_requested` after every step;
that reads flags this thread sets, so the training loop itself never waits on Redis.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared.jobs import JobStore
from shared.lease import JobLease
from shared.scheduler import AttemptMeter, preempt_requested
from shared.settings import get_settings
from worker.training import StopReason

logger = logging.getLogger(__name__)

#: Seconds between charges of the attempt's GPU-seconds to its owner's fair-share usage (and one at its end).
CHARGE_INTERVAL_S = 5.0

#: Set when the Celery worker begins a warm shutdown (SIGTERM, Ctrl-C): running jobs checkpoint
#: and go back to the queue instead of holding the shutdown until they finish.
worker_shutdown = threading.Event()


class JobMonitor(threading.Thread):
    """Renews ``lease`` and watches for a cancel or preemption request on ``job_id`` until :meth:`stop`.

    Args:
        store: job records (for the cancel flag).
        lease: this attempt's lease, already held.
        interval_s: seconds between checks; at most a third of the lease's TTL.
        lease_ttl_s: a lease that could not be renewed for this long counts as lost.
    """

    def __init__(self, store: JobStore, lease: JobLease, job_id: str, interval_s: float, lease_ttl_s: float) -> None:
        super().__init__(name=f"trainq-heartbeat-{job_id[:8]}", daemon=True)
        self.store, self.lease, self.job_id = store, lease, job_id
        self.interval_s = min(interval_s, lease_ttl_s / 3)
        self.lease_ttl_s = lease_ttl_s
        self.cancelled = threading.Event()
        self.preempted = threading.Event()
        self.lease_lost = threading.Event()
        self._stopped = threading.Event()
        self.meter: AttemptMeter | None = None  # charges the owner's fair-share usage as the attempt runs

    def start(self) -> None:
        """Start the thread; first note the attempt for its usage charges (best effort)."""
        try:
            self.meter = AttemptMeter(self.store.redis, self.store.get(self.job_id), get_settings().fair_share_half_life_s)
        except redis.RedisError as exc:
            logger.warning("job %s: usage will not be charged (%s)", self.job_id, exc)
        super().start()

    def stop_requested(self) -> StopReason | None:
        """Why the engine should stop now, if it should (lease loss first: it must not write)."""
        if self.lease_lost.is_set():
            return StopReason.LEASE_LOST
        if self.cancelled.is_set():
            return StopReason.CANCELLED
        if self.preempted.is_set():
            return StopReason.PREEMPTED
        if worker_shutdown.is_set():
            return StopReason.SHUTDOWN
        return None

    def run(self) -> None:
        last_renewed = last_charged = time.monotonic()
        while not self._stopped.wait(self.interval_s):
            try:
                if not self.lease.renew():
                    logger.error("job %s: lease taken over by another worker; stopping", self.job_id)
                    self.lease_lost.set()
                    return
                last_renewed = time.monotonic()
                if self.store.cancel_requested(self.job_id):
                    self.cancelled.set()
                if preempt_requested(self.store.redis, self.job_id):
                    self.preempted.set()
                if time.monotonic() - last_charged >= CHARGE_INTERVAL_S:
                    self._charge()
                    last_charged = time.monotonic()
            except redis.RedisError as exc:
                # Redis restarting: go on training; only a lease that may have expired is lost.
                if time.monotonic() - last_renewed > self.lease_ttl_s:
                    logger.error("job %s: lease not renewed for %.0f s (%s); stopping", self.job_id, self.lease_ttl_s, exc)
                    self.lease_lost.set()
                    return
                logger.warning("job %s: heartbeat failed (%s); retrying", self.job_id, exc)

    def stop(self) -> None:
        """End the thread and charge the attempt's last seconds (the lease is released by the caller)."""
        self._stopped.set()
        if self.is_alive():
            self.join()
        try:
            self._charge()
        except redis.RedisError as exc:
            logger.warning("job %s: usage not charged (%s)", self.job_id, exc)

    def _charge(self) -> None:
        """Charge the attempt's GPU-seconds so far to its owner (fair share)."""
        if self.meter is not None:
            self.meter.charge()
