"""`POST /jobs?dry_run=true` on the real stack: it runs on a worker (never in the API process),
through the job's own preparation, and answers what would fail the job as a 422 with a `loc`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

from shared.queue import make_celery, request_dry_run
from shared.storage import Storage
from tests.fixtures import example_spec
from trainq.sample_data import write_digits


@pytest.fixture
def slow_api(stack, api_token: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_token}"}
    with httpx.Client(base_url=stack.api_url, timeout=150, headers=headers) as client:
        yield client


def dry_run_error(response: httpx.Response) -> dict:
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert set(error) == {"loc", "msg", "type"}
    return error


def test_the_api_process_never_imports_torch(slow_api: httpx.Client, stack):
    report = slow_api.post("/jobs", params={"dry_run": "true"}, json=example_spec())
    assert report.status_code == 200, report.text
    maps = Path(f"/proc/{stack.processes['api'].pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps  # the dry run ran on a worker


def test_importing_the_api_imports_no_torch():
    code = "import sys, api.main; print(sorted(m for m in ('torch', 'torchvision', 'worker.training') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_dry_run_decodes_every_image(slow_api: httpx.Client, storage: Storage, tmp_path: Path):
    write_digits(tmp_path, limit=200)
    (tmp_path / "9" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sorts last: no sample of 8 would meet it
    uri = "s3://trainq/datasets/dry-one-bad-image/"
    storage.upload_dir(tmp_path, uri)
    spec = example_spec()
    spec["dataset"]["uri"] = uri
    error = dry_run_error(slow_api.post("/jobs", params={"dry_run": "true"}, json=spec))
    assert error["loc"] == ["body", "dataset", "uri"] and error["type"] == "dataset_error"
    assert f"{uri}9/9999.png" in error["msg"] and "1 unreadable image(s)" in error["msg"]


def test_the_dry_run_loads_the_initial_weights(slow_api: httpx.Client, storage: Storage, tmp_path: Path):
    spec = example_spec()
    spec["model"]["weights_uri"] = "s3://trainq/weights/not-there.pt"
    error = dry_run_error(slow_api.post("/jobs", params={"dry_run": "true"}, json=spec))
    assert error["loc"] == ["body", "model", "weights_uri"] and "s3://trainq/weights/not-there.pt" in error["msg"]
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "other.pt")  # weights of another model
    spec["model"]["weights_uri"] = storage.upload_file(tmp_path / "other.pt", "s3://trainq/weights/other.pt")
    error = dry_run_error(slow_api.post("/jobs", params={"dry_run": "true"}, json=spec))
    assert error["loc"] == ["body", "model", "weights_uri"] and "does not fit" in error["msg"]


def test_a_job_too_large_for_memory_is_refused_with_the_numbers(slow_api: httpx.Client):
    spec = example_spec() | {"model": {"arch": "resnet18"}, "batch_size": 1400}
    spec["dataset"] = spec["dataset"] | {"image_size": 512}
    error = dry_run_error(slow_api.post("/jobs", params={"dry_run": "true"}, json=spec))
    assert error["loc"] == ["body", "batch_size"] and error["type"] == "memory_budget_exceeded"
    assert "MAX_JOB_MEMORY_BYTES" in error["msg"] and "activations" in error["msg"] and "batch_size 1400 of 1x512x512" in error["msg"]
    assert slow_api.post("/jobs", params={"dry_run": "true"}, json=example_spec()).status_code == 200  # the worker is fine


def test_without_a_worker_the_wait_is_bounded(stack):
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    started = time.monotonic()
    assert request_dry_run(make_celery(stack.settings), client, example_spec(), "dry-run-nobody-listens", 1.5) is None
    assert time.monotonic() - started < 10  # and the message expires: a worker that starts later skips it
