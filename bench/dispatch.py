"""Submit → running and submit → first optimizer step on an idle cluster (one warm worker), the
figure the dispatcher must not worsen (issue 18): a job now waits in its queue's pending set until
the dispatcher sends it, woken by the submit itself.

Runs against whatever code is on ``PYTHONPATH``, so the same script measures a branch and the
commit before it on the same machine, one after the other (absolute seconds from a loaded machine
compare only with a baseline measured beside them):

    .venv/bin/python -m bench.dispatch --jobs 10
    PYTHONPATH=/tmp/base .venv/bin/python /path/to/bench/dispatch.py --jobs 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import BENCH_ENV, describe_machine, median, percentile
from bench.end_to_end import first_step_wall_time, wait_final
from shared.storage import Storage
from tests.fixtures import DIGITS_URI, example_spec
from trainq.stack import LocalStack


def measure(jobs: int, workdir: Path) -> tuple[list[float], list[float]]:
    """``(submit → running, submit → first step)`` in seconds for ``jobs`` 1-epoch digits jobs, one at a time."""
    spec = example_spec() | {"epochs": 1}
    to_running, to_step = [], []
    with LocalStack(workdir, isolated=True, env=BENCH_ENV) as stack, httpx.Client(base_url=stack.api_url, timeout=60) as api:
        stack.seed_digits(DIGITS_URI)
        storage = Storage(stack.settings)
        wait_final(api, api.post("/jobs", json=spec).raise_for_status().json()["id"])  # warm the data cache
        for _ in range(jobs):
            time.sleep(1.0)  # the worker is idle and has said so
            posted = time.time()
            record = wait_final(api, api.post("/jobs", json=spec).raise_for_status().json()["id"])
            to_running.append(next(t["at"] for t in record["transitions"] if t["state"] == "running") - posted)
            to_step.append(first_step_wall_time(storage, record["artifacts"]["tensorboard"]) - posted)
    return to_running, to_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        to_running, to_step = measure(args.jobs, Path(tmp))
    print(describe_machine())
    for name, values in (("submit → running", to_running), ("submit → first step", to_step)):
        print(f"{name}: p50 {median(values) * 1000:.0f} ms, p95 {percentile(values, 95) * 1000:.0f} ms ({len(values)} jobs)")


if __name__ == "__main__":
    main()
