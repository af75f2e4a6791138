"""``make demo``: the main job on real data, through the whole service.

Starts the local stack, uploads scikit-learn's digits (1,797 real 8×8 handwritten digits, 10
classes) to the bucket as an image folder, submits ``examples/digits.json`` over HTTP, shows a
progress bar while a Celery worker trains it, then prints the val accuracy and artifact URIs and
copies the artifacts to ``demo-artifacts/<job_id>/`` so they outlive the stack.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from shared.paths import cache_path
from shared.records import FINAL_STATES as FINAL
from shared.storage import Storage
from trainq.stack import LocalStack

REPO = Path(__file__).resolve().parent.parent
FINAL_STATES = {state.value for state in FINAL}


def watch(client: httpx.Client, job_id: str, poll_s: float = 0.5) -> dict:
    """Poll ``GET /jobs/{id}`` with a progress bar (steps) until the job ends; return its record."""
    # disable=None: a bar on a terminal, nothing when the output is a file or a pipe.
    with tqdm(total=None, unit="step", desc="training", dynamic_ncols=True, disable=None) as bar:
        while True:
            record = client.get(f"/jobs/{job_id}").raise_for_status().json()
            progress = record["progress"]
            if progress["total_steps"] and bar.total != progress["total_steps"]:
                bar.total = progress["total_steps"]
                bar.refresh()
            bar.update(progress["step"] - bar.n)
            postfix = {"state": record["state"], "epoch": f"{progress['epoch']}/{progress['epochs']}"}
            if progress["train_loss"] is not None:
                postfix["loss"] = f"{progress['train_loss']:.3f}"
            if progress["val_accuracy"] is not None:
                postfix["val_acc"] = f"{progress['val_accuracy']:.3f}"
            bar.set_postfix(postfix)
            if record["state"] in FINAL_STATES:
                return record
            time.sleep(poll_s)


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
    # Auth is off on the loopback-only local stack unless AUTH_REQUIRED=true; then a token is made.
    with LocalStack(workdir) as stack, httpx.Client(base_url=stack.api_url, timeout=30, headers=stack.auth_headers()) as client:
        counts = stack.seed_digits(spec["dataset"]["uri"])
        print(f"2/5 uploaded {sum(counts.values())} real digit images in {len(counts)} classes to {spec['dataset']['uri']}")
        response = client.post("/jobs", json=spec)
        if response.status_code != 202:
            print(f"submit refused: {response.status_code} {response.text}", file=sys.stderr)
            return 1
        job_id = response.json()["id"]
        print(f"3/5 POST {stack.api_url}/jobs -> 202, job {job_id}")
        record = watch(client, job_id)
        elapsed = time.monotonic() - started
        if record["state"] != "succeeded":
            print(f"job {job_id} {record['state']}: {record['error']}", file=sys.stderr)
            return 1
        progress, artifacts = record["progress"], record["artifacts"]
        print(
            f"4/5 job {job_id} succeeded on {record['device']}: {progress['epoch']} epochs, {progress['step']} steps, "
            f"val_loss {progress['val_loss']:.4f}, val_accuracy {progress['val_accuracy']:.4f}"
        )
        print(f"    final checkpoint  {artifacts['final_checkpoint']}")
        print(f"    checkpoints       {len(artifacts['checkpoints'])} under {artifacts['final_checkpoint'].rsplit('/', 1)[0]}/")
        print(f"    TensorBoard logs  {artifacts['tensorboard']}")
        local = args.out.resolve() / job_id
        storage = Storage(stack.settings)
        job_prefix = storage.job_uri(job_id)
        for obj in storage.list_objects(job_prefix):
            uri = f"s3://{storage.bucket}/{obj.key}"
            storage.download_file(uri, cache_path(local, obj.key.split(f"{job_id}/", 1)[1], source=uri))
        print(f"5/5 copied the artifacts to {local}/")
        print("\nWatch the curves (the demo's stack is gone; this copy stays):")
        print(f"  .venv/bin/tensorboard --logdir {local}/tensorboard")
        print("Jobs you run under `make up` can be watched straight from the bucket: see README, 'TensorBoard'.")
        print(f"\ndemo took {elapsed:.0f} s")
        if progress["val_accuracy"] < args.min_accuracy:
            print(f"val_accuracy {progress['val_accuracy']:.4f} is below {args.min_accuracy}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
