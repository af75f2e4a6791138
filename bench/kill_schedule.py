"""Fault-injection schedule: kill the training worker at N points, count exactly-once, bit-identical jobs.

Runs on the real local stack (redis-server, moto S3 behind a fault proxy, API, Celery workers).
For each point: a worker trains the job from ``tests/test_fault_tolerance.resumable_spec`` (135
steps, a checkpoint every 20), is killed (kill -9 at a step, kill -9 while a checkpoint is being
uploaded, or SIGTERM), a fresh worker takes over, and the result is compared with an
uninterrupted run of the same spec.

    .venv/bin/python -m bench.kill_schedule            # 20 points, about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from tests.conftest import wait_for_job
from tests.faults import FaultyProxy
from tests.fixtures import DIGITS_URI
from tests.test_end_to_end import read_tensorboard
from tests.test_fault_tolerance import FAST_FAILURE_ENV, FaultStack, resumable_spec
from trainq.stack import LocalStack

TOTAL_STEPS = 135


def schedule(points: int) -> list[tuple[str, int]]:
    """(kind, step) pairs: mostly kill -9 at spread-out steps, some mid-upload kills, some SIGTERMs."""
    uploads = [("kill_mid_upload", step) for step in (20, 40, 60, 100)]
    sigterms = [("sigterm", step) for step in (30, 110)]
    kills = points - len(uploads) - len(sigterms)
    steps = [1 + round(i * (TOTAL_STEPS - 8) / max(1, kills - 1)) for i in range(kills)]
    return [("kill_at_step", s) for s in steps] + uploads + sigterms


def identical(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k], v) for k, v in b["model"].items()) and all(
        torch.equal(a["optimizer"]["state"][i][k], v) for i, s in b["optimizer"]["state"].items() for k, v in s.items()
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trainq-kill-schedule-"))
    with LocalStack(tmp / "stack", workers=0, env=FAST_FAILURE_ENV, isolated=True) as stack:
        s3 = urlparse(stack.env["S3_ENDPOINT_URL"])
        faults = FaultStack(stack, FaultyProxy(s3.hostname, s3.port))
        stack.seed_digits(DIGITS_URI)
        worker = faults.start_worker()
        reference_id = faults.submit(resumable_spec())
        assert wait_for_job(faults.api, reference_id)["state"] == "succeeded"
        reference = faults.final_state_dict(reference_id, tmp)
        rows, good = [], 0
        for kind, step in schedule(args.points):
            job_id = faults.submit(resumable_spec())
            if kind == "kill_mid_upload":
                faults.wait_until(job_id, lambda r: r["state"] == "running")
                faults.proxy.slow_marker = f"/jobs/{job_id}/checkpoints/step-{step:09d}.pt".encode()
                assert faults.proxy.upload_in_flight.wait(120)
            else:
                faults.wait_until(job_id, lambda r, step=step: r["progress"]["step"] >= step)
            at_step = faults.get(job_id)["progress"]["step"]
            if kind == "sigterm":
                stack.stop_process(worker, signal.SIGTERM, timeout_s=60)
            else:
                faults.kill(worker)
            faults.proxy.slow_marker = None
            worker = faults.start_worker()
            record = wait_for_job(faults.api, job_id)
            states = [t["state"] for t in record["transitions"]]
            once = record["state"] == "succeeded" and states == ["queued", "running", "retrying", "running", "succeeded"]
            steps = [s for s, _ in read_tensorboard(record["artifacts"]["tensorboard"].rstrip("/"), stack.env)["scalars"]["train/loss"]]
            once = once and steps == list(range(1, TOTAL_STEPS + 1))
            same = once and identical(faults.final_state_dict(job_id, tmp), reference)
            good += once and same
            rows.append((kind, step, at_step, record["resumed_from"] or "-", once, same))
            print(f"{kind:16} target {step:3d} seen {at_step:3d} resumed {str(record['resumed_from']).rsplit('/', 1)[-1]:20} "
                  f"exactly_once={once} bit_identical={same}", flush=True)
        print(f"\n{good}/{len(rows)} jobs finished exactly once with bit-identical weights")
        return 0 if good == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
