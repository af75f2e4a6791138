"""Figures 1 and 2 of the suite: a job through trainq against the plain script it replaces, and
submit → first optimizer step on a warm worker.

1. **End to end**: ``examples/digits.json`` (lengthened to ``--epochs``) through the local stack,
   POST → ``succeeded`` with every artifact in S3, ÷ ``bench/plain_script.py`` on the same PNGs
   (wall time including imports); and the job's ``progress.runtime_s`` ÷ the script's training loop.
2. **Submit → first step**: 1-epoch digits jobs, one after another on a warm worker (cache warm);
   the time from the POST to the wall time of the job's ``train/loss`` event at step 1.

    .venv/bin/python -m bench.end_to_end --epochs 20 --first-step-jobs 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import BENCH_ENV, Table, median, percentile
from shared.storage import Storage
from tests.fixtures import DIGITS_URI, example_spec
from trainq.sample_data import write_digits
from trainq.stack import LocalStack


def wait_final(api: httpx.Client, job_id: str, timeout_s: float = 1800) -> dict:
    """Poll the job until it is final; return the record (raises if it did not succeed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = api.get(f"/jobs/{job_id}").raise_for_status().json()
        if record["state"] in {"succeeded", "failed", "cancelled"}:
            if record["state"] != "succeeded":
                raise RuntimeError(f"job {job_id} {record['state']}: {record.get('error')}")
            return record
        time.sleep(0.05)
    raise TimeoutError(job_id)


def first_step_wall_time(storage: Storage, tensorboard_uri: str) -> float:
    """Wall time (seconds since the epoch) of the ``train/loss`` event at step 1 of a job's run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        bucket_prefix = tensorboard_uri.rstrip("/") + "/"
        for obj in storage.list_objects(bucket_prefix):
            storage.download_file(f"s3://{storage.bucket}/{obj.key}", Path(tmp) / obj.key.rsplit("/", 1)[-1])
        events = EventAccumulator(tmp, size_guidance={"scalars": 0})
        events.Reload()
        return next(event.wall_time for event in events.Scalars("train/loss") if event.step == 1)


def run_plain_script(data: Path, epochs: int, threads: int | None = None, extra: list[str] | None = None) -> tuple[float, dict]:
    """Run the baseline script in a fresh interpreter; return (wall seconds incl. imports, its JSON).

    ``threads`` sets ``OMP_NUM_THREADS`` (a tuned script); None leaves torch's default. ``extra``
    replaces the ``--epochs`` argument with the script's own arguments.
    """
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "bench.plain_script", str(data), *(extra or ["--epochs", str(epochs)])],
        capture_output=True, text=True, check=True, env=env,
    )
    return time.perf_counter() - started, json.loads(out.stdout.strip().splitlines()[-1])


def bench(epochs: int, first_step_jobs: int, workdir: Path) -> list[Table]:
    """Run both figures on one local stack; return their tables."""
    data = workdir / "digits"
    write_digits(data)
    spec = example_spec() | {"epochs": epochs}
    end_to_end = Table("End to end: digits through trainq ÷ the plain script")
    first = Table("Submit → first optimizer step (warm worker)")
    with LocalStack(workdir / "stack", isolated=True, env=BENCH_ENV) as stack, httpx.Client(base_url=stack.api_url, timeout=60) as api:
        storage = Storage(stack.settings)
        storage.upload_dir(data, DIGITS_URI)
        warm = api.post("/jobs", json=example_spec() | {"epochs": 1}).raise_for_status().json()
        wait_final(api, warm["id"])  # downloads and verifies the data once, as any later job finds it
        script_wall, script = run_plain_script(data, epochs)
        posted = time.time()
        job = api.post("/jobs", json=spec).raise_for_status().json()
        record = wait_final(api, job["id"])
        trainq_wall = record["finished_at"] - posted
        runtime = record["progress"]["runtime_s"]
        end_to_end.add(f"POST → succeeded ÷ script wall ({epochs} epochs)", f"{trainq_wall:.1f} s", f"{script_wall:.1f} s",
                       trainq_wall / script_wall, "≤ 1.05", trainq_wall / script_wall <= 1.05)
        end_to_end.add("job runtime_s ÷ script training loop", f"{runtime:.1f} s", f"{script['train_s']:.1f} s",
                       runtime / script["train_s"], "≤ 1.05", runtime / script["train_s"] <= 1.05)
        tuned_wall, tuned = run_plain_script(data, epochs, threads=1)
        end_to_end.add("POST → succeeded ÷ script wall, script with OMP_NUM_THREADS=1", f"{trainq_wall:.1f} s",
                       f"{tuned_wall:.1f} s", trainq_wall / tuned_wall, "≤ 1.05", trainq_wall / tuned_wall <= 1.05)
        end_to_end.add("job runtime_s ÷ tuned script's training loop", f"{runtime:.1f} s", f"{tuned['train_s']:.1f} s",
                       runtime / tuned["train_s"], "≤ 1.05", runtime / tuned["train_s"] <= 1.05)
        end_to_end.notes.append(
            f"val accuracy: trainq {record['progress']['val_accuracy']:.3f}, script {script['val_accuracy']:.3f}; "
            "the worker's data cache was warm (one 1-epoch job before)."
        )
        delays = []
        for _ in range(first_step_jobs):
            posted = time.time()
            job = api.post("/jobs", json=example_spec() | {"epochs": 1}).raise_for_status().json()
            record = wait_final(api, job["id"])
            delays.append(first_step_wall_time(storage, record["artifacts"]["tensorboard"]) - posted)
        p50, p95 = median(delays), percentile(delays, 95)
        first.add(f"p50 over {len(delays)} jobs", f"{p50 * 1000:.0f} ms", "", None, "p50 ≤ 1.0 s", p50 <= 1.0)
        first.add("p95", f"{p95 * 1000:.0f} ms", "", None, "", None)
    return [end_to_end, first]


def main() -> None:
    """Run and print; ``bench/run.py`` collects the tables into ``bench/results.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--first-step-jobs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for table in bench(args.epochs, args.first_step_jobs, Path(tmp)):
            print(table.markdown())


if __name__ == "__main__":
    main()
