"""Which workers are up: each worker publishes its status to Redis, the API reads it.

A worker writes its :class:`WorkerStatus` as JSON to ``trainq:worker:<name>`` with a TTL of three
heartbeat intervals, at start and every ``WORKER_HEARTBEAT_INTERVAL_S``; a worker that stops
reporting disappears on its own. The sorted set ``trainq:workers`` (score: last report) lists the
names, so the API finds the workers without scanning keys. The API never imports torch: the
worker reports its device itself.
"""

from __future__ import annotations

import json

import redis
from pydantic import BaseModel, Field

WORKER_KEY = "trainq:worker:{}"
WORKERS_KEY = "trainq:workers"
#: A status lives this many heartbeat intervals without a new report.
MISSED_HEARTBEATS = 3


class GpuInfo(BaseModel):
    """One CUDA device as ``torch.cuda`` reports it."""

    index: int
    name: str = Field(description="e.g. `NVIDIA H200`.")
    memory_bytes: int = Field(description="Total device memory in bytes.")


class DeviceInfo(BaseModel):
    """What a worker trains on: ``torch.cuda.is_available()`` and, with CUDA, its GPUs."""

    cuda_available: bool
    cuda_version: str | None = Field(None, description="CUDA version torch was built with (`torch.version.cuda`).")
    torch_version: str | None = None
    gpus: list[GpuInfo] = Field(default_factory=list, description="Visible GPUs (`CUDA_VISIBLE_DEVICES`).")


class WorkerMetrics(BaseModel):
    """The worker's counters and latest rates since it started (exported on the API's `/metrics`)."""

    samples_per_s: float | None = Field(None, description="Training throughput of the current job, samples/s.")
    step_time_s: float | None = Field(None, description="Mean seconds per optimizer step since the previous progress report.")
    upload_bytes_total: int = Field(0, description="Bytes uploaded to S3 (checkpoints, events, logs).")
    jobs_total: dict[str, int] = Field(default_factory=dict, description="Attempts ended, by outcome (job state).")


class WorkerStatus(BaseModel):
    """A live worker, as it last reported itself."""

    name: str = Field(description="Celery node name, e.g. `gpu0@node-7`.")
    host: str
    pid: int
    queues: list[str]
    device: DeviceInfo
    current_job: str | None = Field(None, description="Id of the job it is training, if any.")
    started_at: float = Field(description="When the worker started (seconds since the epoch).")
    last_heartbeat: float = Field(description="When it last reported (seconds since the epoch).")
    metrics: WorkerMetrics = Field(default_factory=WorkerMetrics)


def publish(client: redis.Redis, status: WorkerStatus, interval_s: float) -> None:
    """Write ``status`` with a TTL of :data:`MISSED_HEARTBEATS` × ``interval_s`` seconds."""
    pipe = client.pipeline(transaction=True)
    pipe.set(WORKER_KEY.format(status.name), status.model_dump_json(), px=max(1, int(MISSED_HEARTBEATS * interval_s * 1000)))
    pipe.zadd(WORKERS_KEY, {status.name: status.last_heartbeat})
    pipe.execute()


def withdraw(client: redis.Redis, name: str) -> None:
    """Remove worker ``name`` at once (a clean shutdown)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(WORKER_KEY.format(name))
    pipe.zrem(WORKERS_KEY, name)
    pipe.execute()


def live_workers(client: redis.Redis) -> list[WorkerStatus]:
    """Every worker whose status has not expired, by name; names of expired ones are dropped."""
    entries = [(member.decode(), score) for member, score in client.zrange(WORKERS_KEY, 0, -1, withscores=True)]
    if not entries:
        return []
    raw = client.mget([WORKER_KEY.format(name) for name, _ in entries])
    gone = [name for (name, _), value in zip(entries, raw) if value is None]
    if gone:
        client.zrem(WORKERS_KEY, *gone)  # a worker that reports again is added back
    return sorted(
        (WorkerStatus.model_validate(json.loads(value)) for value in raw if value is not None), key=lambda s: s.name
    )
