"""Figure 3 of the suite: ``POST /jobs`` throughput and latency ÷ raw Celery ``send_task``.

A stack with no worker (the queue is not consumed), ``--clients`` concurrent clients posting the
digits spec ``--requests`` times in all (bounded: the run stops by itself). Each 202 means the
spec was validated, the job recorded in Redis and its message enqueued. The baseline sends the
same number of raw ``send_task`` messages into the same Redis from as many threads.

    .venv/bin/python -m bench.submit --requests 2000 --clients 16 --api-workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import BENCH_ENV, Table, median, percentile
from shared.queue import TRAIN_TASK, make_celery
from tests.fixtures import example_spec
from trainq.stack import LocalStack


async def _post_all(url: str, requests: int, clients: int) -> tuple[float, list[float]]:
    spec, latencies, counter = example_spec(), [], iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as api:

        async def client() -> None:
            for _ in counter:
                started = time.perf_counter()
                response = await api.post("/jobs", json=spec)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 202:
                    raise RuntimeError(f"POST /jobs answered {response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started, latencies


def _send_raw(redis_url: str, requests: int, clients: int) -> float:
    from shared.settings import Settings

    app = make_celery(Settings(redis_url=redis_url))

    def send(_: int) -> None:
        app.send_task(TRAIN_TASK, args=["0" * 32], queue="raw-baseline")

    send(0)  # connect once
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(requests)))
    return time.perf_counter() - started


def bench(requests: int, clients: int, api_workers: int, workdir: Path) -> Table:
    """Measure both in one stack; return the table."""
    table = Table(f"POST /jobs: {requests} requests from {clients} concurrent clients, API with {api_workers} uvicorn worker(s)")
    env = BENCH_ENV | {"API_WORKERS": str(api_workers)}
    with LocalStack(workdir, workers=0, isolated=True, env=env) as stack:
        asyncio.run(_post_all(stack.api_url, min(200, requests), clients))  # warm-up (imports, connections)
        elapsed, latencies = asyncio.run(_post_all(stack.api_url, requests, clients))
        raw_elapsed = _send_raw(stack.env["REDIS_URL"], requests, clients)
    rate, raw_rate = requests / elapsed, requests / raw_elapsed
    table.add("jobs/s", f"{rate:.0f}/s", f"{raw_rate:.0f}/s (raw send_task)", rate / raw_rate, "≥ 1,000/s and ≥ 0.5 of raw",
              rate >= 1000 and rate / raw_rate >= 0.5)
    p50, p99 = median(latencies), percentile(latencies, 99)
    table.add("latency p50", f"{p50 * 1000:.1f} ms", "", None, "", None)
    table.add("latency p99", f"{p99 * 1000:.1f} ms", "", None, "< 50 ms", p99 < 0.050)
    table.notes.append("The load generator shares the machine's cores with the API, Redis and moto.")
    return table


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--api-workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(bench(args.requests, args.clients, args.api_workers, Path(tmp)).markdown())


if __name__ == "__main__":
    main()
