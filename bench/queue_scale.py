"""Figure 6 of the suite: 100,000 queued jobs: ``GET /jobs`` page latency and Redis memory per job.

Jobs are recorded straight through :class:`shared.jobs.JobStore` (what ``POST /jobs`` does
before it enqueues; the messages are not the subject here), then ``GET /jobs`` pages are read.
The baseline is the same page read when the store holds 100 jobs.

    .venv/bin/python -m bench.queue_scale --jobs 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.common import BENCH_ENV, Table, percentile
from shared.jobs import JobStore
from shared.records import ANONYMOUS_OWNER
from shared.spec import JobSpec
from tests.fixtures import example_spec
from trainq.stack import LocalStack


def _page_latencies(api: httpx.Client, reads: int) -> list[float]:
    """Seconds per ``GET /jobs?limit=20`` page, walking the pages with ``cursor`` (50 deep, then again)."""
    latencies, cursor = [], None
    for index in range(reads):
        params = {"limit": 20} | ({"cursor": cursor} if cursor and index % 50 else {})
        started = time.perf_counter()
        page = api.get("/jobs", params=params).raise_for_status().json()
        latencies.append(time.perf_counter() - started)
        cursor = page.get("next_cursor")
    return latencies


def _fill(store: JobStore, spec: JobSpec, count: int) -> None:
    for _ in range(count):
        store.create(spec, "default", owner=ANONYMOUS_OWNER)


def bench(jobs: int, reads: int, workdir: Path) -> Table:
    """Fill the store to ``jobs`` records and read pages; return the table."""
    table = Table(f"Queue scale: {jobs:,} recorded jobs")
    with LocalStack(workdir, workers=0, isolated=True, env=BENCH_ENV) as stack, httpx.Client(base_url=stack.api_url, timeout=60) as api:
        client = redis.Redis.from_url(stack.env["REDIS_URL"])
        store, spec = JobStore(client), JobSpec.model_validate(example_spec())
        before = client.info("memory")["used_memory"]
        _fill(store, spec, 100)
        small = _page_latencies(api, reads)
        _fill(store, spec, jobs - 100)
        per_job = (client.info("memory")["used_memory"] - before) / jobs
        large = _page_latencies(api, reads)
    p99_small, p99_large = percentile(small, 99), percentile(large, 99)
    table.add("GET /jobs?limit=20 p99", f"{p99_large * 1000:.1f} ms", f"{p99_small * 1000:.1f} ms (100 jobs)",
              p99_large / p99_small, "flat as the queue grows", None)
    table.add("Redis memory per job", f"{per_job / 1024:.1f} KiB", "", None, "", None)
    return table


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(bench(args.jobs, args.reads, Path(tmp)).markdown())


if __name__ == "__main__":
    main()
