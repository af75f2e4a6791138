"""``make demo``: the main job on real data, through the whole service.

Starts the local stack in a temporary folder, uploads scikit-learn's digits (1,797 real 8×8
handwritten digits, 10 classes) to the bucket as an image folder, submits ``examples/digits.json``
with the Python client, shows the job's progress as ``trainq submit --wait`` does (a bar on a
terminal, a line per phase and epoch off one), then prints the val accuracy and artifact URIs and
downloads the artifacts to ``demo-artifacts/<job_id>/`` so they outlive the stack. The temporary
folder is removed at the end (kept, with its logs, when something failed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared.records import JobState
from trainq import terminal
from trainq.display import Watcher
from trainq.client import Client, TrainqClientError
from trainq.stack import LocalStack

REPO = Path(__file__).resolve().parent.parent


def run(stack: LocalStack, spec: dict, out: Path, min_accuracy: float, started: float) -> int:
    """Seed, submit, watch and download on a running ``stack``; return the exit status."""
    console = terminal.console()
    counts = stack.seed_digits(spec["dataset"]["uri"])
    terminal.write(f"2/5 uploaded {sum(counts.values())} real digit images in {len(counts)} classes to {spec['dataset']['uri']}")
    # Auth is off on the loopback-only local stack unless AUTH_REQUIRED=true; then a token is made.
    token = stack.auth_headers().get("Authorization", "").removeprefix("Bearer ") or None
    with Client(stack.api_url, token) as client:
        job = client.submit(spec)
        terminal.write(f"3/5 POST {stack.api_url}/jobs -> 202, job {job.id}")
        with Watcher(console) as watcher:
            record = job.wait(on_update=watcher.update)
        elapsed = time.monotonic() - started
        if record.state is not JobState.SUCCEEDED:
            terminal.write(f"job {job.id} {record.state}: {record.error}", file=sys.stderr)
            return 1
        progress, artifacts = record.progress, record.artifacts
        terminal.write(
            f"4/5 job {job.id} succeeded on {record.device}: {progress.epoch} epochs, {progress.step} steps, "
            f"val_loss {progress.val_loss:.4f}, val_accuracy {progress.val_accuracy:.4f}"
        )
        terminal.write(f"    final checkpoint  {artifacts.final_checkpoint}")
        terminal.write(f"    checkpoints       {len(artifacts.checkpoints)} under {artifacts.final_checkpoint.rsplit('/', 1)[0]}/")
        terminal.write(f"    TensorBoard logs  {artifacts.tensorboard}")
        client.download_artifacts(job.id, out)  # to out/<job_id>/, as `trainq artifacts ID --download out`
        local = out.resolve() / job.id
        terminal.write(f"5/5 copied the artifacts to {local}/")
    terminal.write("")
    terminal.write("Watch the curves (the demo's stack is gone; this copy stays):")
    terminal.write(f"  .venv/bin/tensorboard --logdir {local}/tensorboard")
    terminal.write("Jobs you run under `make up` can be watched straight from the bucket: see README, 'TensorBoard'.")
    terminal.write("")
    terminal.write(f"demo took {elapsed:.0f} s")
    if progress.val_accuracy < min_accuracy:
        terminal.write(f"val_accuracy {progress.val_accuracy:.4f} is below {min_accuracy}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when the job succeeds with val accuracy ≥ ``--min-accuracy``."""
    parser = argparse.ArgumentParser(description="Train a small CNN on real handwritten digits through trainq.")
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "digits.json")
    parser.add_argument("--out", type=Path, default=Path("demo-artifacts"), help="where artifacts are copied")
    parser.add_argument("--min-accuracy", type=float, default=0.97)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="trainq-demo-"))
    print(f"1/5 starting the local stack (redis-server, moto S3, API, Celery worker); logs in {workdir}/logs", flush=True)
    status = 1
    try:
        with LocalStack(workdir) as stack:
            status = run(stack, spec, args.out, args.min_accuracy, started)
    except TrainqClientError as exc:
        terminal.write(f"error: {exc}", file=sys.stderr)
    finally:
        if status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"the stack's logs are kept in {workdir}/logs", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
