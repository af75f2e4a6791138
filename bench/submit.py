"""Figure 3 of the suite: ``POST /jobs`` throughput and latency ÷ raw Celery ``send_task``.

A stack with no worker (the queue is not consumed), ``--clients`` concurrent clients posting the
digits spec ``--requests`` times in all (bounded: the run stops by itself). Each 202 means the
spec was validated, the job recorded in Redis and its message enqueued. The baseline sends the
same number of raw ``send_task`` messages into the same Redis from as many threads.

    .venv/bin/python -m bench.submit --requests 2000 --clients 16 [--api-workers 2] [--client httpx] [--no-auth]

By default the API runs with ``AUTH_REQUIRED=true`` (a token lookup per request, as deployed) and
the load comes from a minimal HTTP/1.1 client, since httpx would take as much CPU as the API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import BENCH_ENV, Table, median, percentile
from shared.queue import TRAIN_TASK, make_celery
from tests.fixtures import example_spec
from trainq.stack import LocalStack


async def _post_all(url: str, requests: int, clients: int, headers: dict[str, str] | None = None) -> tuple[float, list[float]]:
    """httpx: ``clients`` concurrent keep-alive connections posting the digits spec ``requests`` times."""
    spec, latencies, counter = example_spec(), [], iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=headers) as api:

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


async def _post_all_raw(url: str, requests: int, clients: int, headers: dict[str, str] | None = None) -> tuple[float, list[float]]:
    """The same load as :func:`_post_all` from a minimal HTTP/1.1 client: one pre-encoded request
    written on each of ``clients`` keep-alive connections, the answer read by its Content-Length.
    httpx costs ~2 ms of CPU a request, as much as the API itself, on the same 2 cores; this ~0.1 ms."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(example_spec()).encode()
    head = [f"POST /jobs HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    latencies, counter = [], iter(range(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for _ in counter:
                started = time.perf_counter()
                writer.write(request)
                status_and_headers = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", status_and_headers).group(1))
                answer = await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if not status_and_headers.startswith(b"HTTP/1.1 202 "):
                    raise RuntimeError(f"POST /jobs answered {status_and_headers[:12]!r}: {answer[:200]!r}")
        finally:
            writer.close()

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


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(requests: int, clients: int, api_workers: int, workdir: Path, *, client: str = "raw", auth: bool = True) -> Table:
    """Measure both in one stack; return the table.

    ``client``: ``raw`` (:func:`_post_all_raw`) or ``httpx`` (:func:`_post_all`); ``auth``: the API
    runs with ``AUTH_REQUIRED=true`` and the clients send a token (a lookup per request, as in production).
    """
    post = {"raw": _post_all_raw, "httpx": _post_all}[client]
    table = Table(f"POST /jobs: {requests} requests from {clients} concurrent clients ({client}), API with "
                  f"{api_workers} uvicorn worker(s), auth {'on' if auth else 'off'}")
    env = BENCH_ENV | {"API_WORKERS": str(api_workers), "AUTH_REQUIRED": str(auth).lower()}
    with LocalStack(workdir, workers=0, isolated=True, env=env) as stack:
        headers = stack.auth_headers("bench") if auth else {}
        asyncio.run(post(stack.api_url, min(200, requests), clients, headers))  # warm-up (imports, connections)
        api_pid = stack.processes["api"].pid
        api_cpu = _cpu_s(api_pid)
        elapsed, latencies = asyncio.run(post(stack.api_url, requests, clients, headers))
        api_cpu = _cpu_s(api_pid) - api_cpu  # with --workers > 1: only the supervisor's, not shown
        raw_elapsed = _send_raw(stack.env["REDIS_URL"], requests, clients)
    rate, raw_rate = requests / elapsed, requests / raw_elapsed
    table.add("jobs/s", f"{rate:.0f}/s", f"{raw_rate:.0f}/s (raw send_task)", rate / raw_rate, "≥ 1,000/s and ≥ 0.5 of raw",
              rate >= 1000 and rate / raw_rate >= 0.5)
    p50, p99 = median(latencies), percentile(latencies, 99)
    table.add("latency p50", f"{p50 * 1000:.1f} ms", "", None, "", None)
    table.add("latency p99", f"{p99 * 1000:.1f} ms", "", None, "< 50 ms", p99 < 0.050)
    if api_workers == 1:
        table.add("API CPU per request", f"{api_cpu / requests * 1000:.2f} ms", "", None, "", None)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    table.notes.append(f"The load generator shares the machine's cores with the API, Redis and moto (load {load} after the run).")
    return table


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw", help="the load generator (raw: a minimal HTTP/1.1 client)")
    parser.add_argument("--no-auth", dest="auth", action="store_false", help="AUTH_REQUIRED=false: no token lookup")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(bench(args.requests, args.clients, args.api_workers, Path(tmp), client=args.client, auth=args.auth).markdown())


if __name__ == "__main__":
    main()
