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

from shared.schemas import WorkerStatus

WORKER_KEY = "trainq:worker:{}"
WORKERS_KEY = "trainq:workers"
#: A status lives this many heartbeat intervals without a new report.
MISSED_HEARTBEATS = 3


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
