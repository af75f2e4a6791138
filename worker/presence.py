"""The worker's own report: who it is, what it runs on, what it is doing, and its counters.

A thread publishes a :class:`shared.schemas.WorkerStatus` to Redis when the worker is ready and
every ``WORKER_HEARTBEAT_INTERVAL_S`` (``GET /workers``, ``/readyz``); the API exports the
counters on ``/metrics`` as ``trainq_worker_*`` (so one scrape of the API covers every worker,
also those on nodes Prometheus cannot reach). The task updates :data:`STATS` as jobs run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import redis

from shared.records import JobState, Progress
from shared.scheduler import wake
from shared.schemas import DeviceInfo, GpuInfo, WorkerMetrics, WorkerStatus
from shared.settings import Settings
from shared.storage import Storage
from shared.workers import publish, withdraw

logger = logging.getLogger(__name__)


class WorkerStats:
    """What this worker process is doing and has done; safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current_job: str | None = None
        self._last_started: str | None = None
        self._metrics = WorkerMetrics()
        self._last_progress: tuple[int, float] | None = None  # (step, runtime_s)
        #: Set when the current job changes, so the status is published at once.
        self.changed = threading.Event()

    def job_started(self, job_id: str) -> None:
        """An attempt of ``job_id`` began on this worker."""
        with self._lock:
            self.current_job = self._last_started = job_id
            self._last_progress = None
            self._metrics.samples_per_s = self._metrics.step_time_s = None
        self.changed.set()

    def job_ended(self) -> None:
        """The current attempt ended (whatever its outcome)."""
        with self._lock:
            self.current_job = None
            self._metrics.samples_per_s = self._metrics.step_time_s = None
        self.changed.set()

    def count_outcome(self, job_id: str, state: JobState) -> None:
        """Count how an attempt of ``job_id`` ended; a delivery that ran no attempt is not counted."""
        with self._lock:
            if self._last_started != job_id:
                return
            self._last_started = None
            self._metrics.jobs_total[state.value] = self._metrics.jobs_total.get(state.value, 0) + 1

    def observe_progress(self, progress: Progress) -> None:
        """Take throughput and step time from a progress report."""
        with self._lock:
            self._metrics.samples_per_s = progress.samples_per_s
            if self._last_progress is not None and progress.step > self._last_progress[0]:
                steps = progress.step - self._last_progress[0]
                self._metrics.step_time_s = (progress.runtime_s - self._last_progress[1]) / steps
            self._last_progress = (progress.step, progress.runtime_s)

    def add_upload_bytes(self, size: int) -> None:
        """Count ``size`` bytes uploaded to S3."""
        with self._lock:
            self._metrics.upload_bytes_total += size

    def snapshot(self) -> tuple[str | None, WorkerMetrics]:
        """``(current job, a copy of the metrics)``."""
        with self._lock:
            return self.current_job, self._metrics.model_copy(deep=True)


#: This process's stats (one worker per process: the solo pool).
STATS = WorkerStats()


class MeteredStorage(Storage):
    """:class:`Storage` that counts the bytes it uploads in :data:`STATS`."""

    def upload_file(self, path: Path, uri: str) -> str:
        size = path.stat().st_size
        result = super().upload_file(path, uri)
        STATS.add_upload_bytes(size)
        return result


def device_info() -> DeviceInfo:
    """``torch.cuda.is_available()`` and the visible GPUs' names and memory (imports torch)."""
    import torch

    available = torch.cuda.is_available()
    gpus = []
    if available:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(index=index, name=props.name, memory_bytes=props.total_memory))
    return DeviceInfo(cuda_available=available, cuda_version=torch.version.cuda, torch_version=torch.__version__, gpus=gpus)


class WorkerPresence(threading.Thread):
    """Publishes this worker's status every ``settings.worker_heartbeat_interval_s`` until :meth:`stop`.

    Args:
        client: Redis of the job records.
        name: the Celery node name (``worker1@host``).
        queues: the queues the worker consumes.
    """

    def __init__(self, client: redis.Redis, name: str, queues: list[str], settings: Settings, stats: WorkerStats = STATS) -> None:
        super().__init__(name="trainq-presence", daemon=True)
        self.redis, self.interval_s, self.stats = client, settings.worker_heartbeat_interval_s, stats
        self.status = WorkerStatus(
            name=name, host=socket.gethostname(), pid=os.getpid(), queues=sorted(queues), device=device_info(),
            started_at=time.time(), last_heartbeat=time.time(),
        )
        self._stopped = threading.Event()
        self._published = False

    def publish_now(self) -> None:
        """Write the current status (raises on a Redis error); a worker falling idle wakes the dispatcher."""
        current_job, metrics = self.stats.snapshot()
        was_idle = self._published and self.status.current_job is None
        self.status = self.status.model_copy(update={"current_job": current_job, "metrics": metrics, "last_heartbeat": time.time()})
        publish(self.redis, self.status, self.interval_s)
        self._published = True
        if current_job is None and not was_idle:
            wake(self.redis)

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.publish_now()
            except redis.RedisError as exc:  # Redis restarting: report again next time
                logger.warning("worker status not published (%s)", exc)
            self.stats.changed.wait(self.interval_s)  # a job starting or ending is reported at once
            self.stats.changed.clear()

    def stop(self) -> None:
        """Stop reporting and remove the status (a clean shutdown)."""
        self._stopped.set()
        self.stats.changed.set()
        if self.is_alive():
            self.join(timeout=5)  # no report after the withdrawal
        try:
            withdraw(self.redis, self.status.name)
        except redis.RedisError:
            pass  # it expires by itself
