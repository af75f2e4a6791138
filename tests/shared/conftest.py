"""A Redis server of its own for the scheduler's tests (no API, no workers), and worker statuses as
real workers publish them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shared.jobs import JobStore
from shared.schemas import DeviceInfo, WorkerStatus
from shared.workers import publish
from trainq.stack import LocalStack


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://…`` of a redis-server started for these tests."""
    stack = LocalStack(tmp_path_factory.mktemp("sched-redis"), workers=0, isolated=True)
    stack.start_redis()
    try:
        yield stack.env["REDIS_URL"]
    finally:
        stack.stop()


def publish_worker(store: JobStore, name: str, queues: tuple[str, ...] = ("default",), current_job: str | None = None) -> None:
    """Write the status a worker ``name`` on ``queues`` publishes, running ``current_job``."""
    status = WorkerStatus(name=name, host="h", pid=1, queues=list(queues), device=DeviceInfo(cuda_available=False),
                          current_job=current_job, started_at=time.time(), last_heartbeat=time.time())
    publish(store.redis, status, 60)
