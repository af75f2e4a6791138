"""The real service path on the GPU: a job over HTTP to the local stack, a Celery worker on CUDA,
artifacts in S3, and kill -9 mid-job resumed bit-identically (part of ``bench/gpu.sh``).

The stack is trainq's own (redis-server, moto's S3 server, the API under uvicorn, Celery
workers), with short leases so a killed worker's job is requeued within seconds. The job trains
``small_cnn`` (max-pooling windows that do not overlap: every backward kernel it runs is
deterministic on CUDA) on a prefix of JPEG photos uploaded to S3, ``decode: auto`` (on the device
on a CUDA worker), ``deterministic: true``: the uninterrupted run and the killed-and-resumed one
must end with equal weights.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import torch

from shared.storage import Storage
from tests.conftest import wait_for_job
from tests.test_fault_tolerance import FAST_FAILURE_ENV
from trainq.sample_data import write_photo_folder
from trainq.stack import LocalStack
from worker.training.checkpoint import load_checkpoint


def service_spec(uri: str, image_size: int, epochs: int, every_steps: int) -> dict:
    """The service check's job: small_cnn on the photos, a checkpoint every ``every_steps`` steps."""
    return {
        "name": "gpu-service-check",
        "dataset": {
            "type": "image_folder", "uri": uri, "val_fraction": 0.1, "image_size": image_size,
            "train_transforms": [{"name": "random_resized_crop", "size": image_size}, {"name": "horizontal_flip"}],
            "normalize": {"preset": "imagenet"},
        },
        "model": {"arch": "small_cnn"},
        "epochs": epochs,
        "batch_size": 32,
        "num_workers": 2,
        "checkpoint": {"every_epochs": 1, "every_steps": every_steps},
        "performance": {"deterministic": True},
    }


def service_path(workdir: Path, images: int, image_size: int, epochs: int, log) -> list[tuple[str, bool, str]]:
    """Run the checks; return ``(name, ok, detail)`` rows."""
    rows: list[tuple[str, bool, str]] = []
    stack = LocalStack(workdir / "service-stack", workers=0, env=FAST_FAILURE_ENV | {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, isolated=True)
    with stack:
        api = httpx.Client(base_url=stack.api_url, timeout=30)
        storage = Storage(stack.settings)
        write_photo_folder(workdir / "service-photos", count=images)
        uri = "s3://trainq/datasets/gpu-photos/"
        storage.upload_dir(workdir / "service-photos", uri)
        steps_per_epoch = (images - round(images * 0.1)) // 32
        every = max(2, steps_per_epoch // 2)
        spec = service_spec(uri, image_size, epochs=epochs, every_steps=every)
        stack.start_worker("gpu1")
        log("service path: the uninterrupted job over HTTP")
        started = time.perf_counter()
        reference = wait_for_job(api, api.post("/jobs", json=spec).raise_for_status().json()["id"], timeout_s=240)
        seconds = time.perf_counter() - started
        want_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        final = (reference.get("artifacts") or {}).get("final_checkpoint")
        ok = reference["state"] == "succeeded" and want_device in (reference.get("device") or "") and bool(final)
        rows.append(("a job over HTTP succeeds on the worker's device, artifacts in S3", ok,
                     f"state {reference['state']}, device {reference.get('device')!r}, final {final}, POST → done {seconds:.1f} s"))
        if not ok:
            return rows
        log("service path: the same job, its worker killed (-9) mid-job, a fresh worker resumes it")
        job_id = api.post("/jobs", json=spec).raise_for_status().json()["id"]
        kill_after = every + max(1, every // 2)  # past the first step checkpoint, before the next
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            record = api.get(f"/jobs/{job_id}").raise_for_status().json()
            if (record.get("progress") or {}).get("step", 0) >= kill_after or record["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.05)
        step_killed = (record.get("progress") or {}).get("step", 0)
        stack.stop_process("gpu1", signal.SIGKILL)
        stack.start_worker("gpu2")
        resumed = wait_for_job(api, job_id, timeout_s=240)
        same = resumed["state"] == "succeeded" and resumed["attempts"] >= 2
        if same:
            a = load_checkpoint(storage.download_file(reference["artifacts"]["final_checkpoint"], workdir / "reference.pt"))
            b = load_checkpoint(storage.download_file(resumed["artifacts"]["final_checkpoint"], workdir / "resumed.pt"))
            same = a["step"] == b["step"] and all(torch.equal(b["model"][name], t) for name, t in a["model"].items())
        rows.append(("kill -9 mid-job, resumed by a fresh worker: bit-identical final weights", same,
                     f"killed at step {step_killed} (checkpoints every {every}); state {resumed['state']}, "
                     f"attempts {resumed['attempts']}, device {resumed.get('device')!r}"))
        api.close()
    return rows
