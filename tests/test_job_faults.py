"""A job's own faults, through the real stack (HTTP → Redis → Celery worker → S3): each fails
once (no retry), with an error that names the line, key, field or step — or, where trainq can
avoid the fault (a last batch of 1 for BatchNorm), the job succeeds."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from shared.storage import Storage
from tests.conftest import wait_for_job
from tests.fixtures import fast_digits_spec
from worker.training.checkpoint import load_checkpoint


def csv_spec(uri: str, **overrides) -> dict:
    spec = {
        "dataset": {"type": "csv", "uri": uri, "target": "y", "task": "regression"},
        "model": {"arch": "mlp", "hidden_sizes": [8]},
        "epochs": 1,
        "batch_size": 4,
    }
    return spec | overrides


def run_job(api: httpx.Client, spec: dict) -> dict:
    response = api.post("/jobs", json=spec)
    assert response.status_code == 202, response.text
    return wait_for_job(api, response.json()["id"], timeout_s=120)


def failed_once(job: dict) -> str:
    assert job["state"] == "failed" and job["attempts"] == 1, (job["state"], job["attempts"], job["error"])
    assert [t["state"] for t in job["transitions"]] == ["queued", "running", "failed"]
    assert "/cache" not in job["error"] and "Traceback" not in job["error"]
    return job["error"]


def put(storage: Storage, key: str, body: bytes) -> str:
    storage.client.put_object(Bucket="trainq", Key=key, Body=body)
    return f"s3://trainq/{key}"


ROWS = "".join(f"{i},{i % 3},{i * 0.5}\n" for i in range(20))


@pytest.mark.parametrize(
    ("row", "error"),
    [
        # Extra fields used to shift silently into the wrong columns (and the job succeeded).
        ("1,2,3,password123", "line 5 has 4 field(s); the header has 3"),
        # A missing target was a TypeError, retried 3 times.
        ("1,2", "line 5 has 2 field(s); the header has 3"),
        ("1,2,", "line 5: column 'y' (dataset.target) is empty"),
    ],
)
def test_a_csv_row_that_does_not_fit_fails_once_naming_the_line(api: httpx.Client, storage: Storage, row: str, error: str):
    uri = put(storage, f"tests/faults/rows-{len(row)}.csv", f"a,b,y\n1,2,3\n4,5,6\n7,8,9\n{row}\n{ROWS}".encode())
    message = failed_once(run_job(api, csv_spec(uri)))
    assert message == f"{uri} {error}"
    assert "password123" not in message


def test_missing_weights_fail_once_naming_the_uri(api: httpx.Client, storage: Storage):
    uri = "s3://trainq/tests/faults/no-such-weights.pt"
    spec = fast_digits_spec(epochs=1, model={"arch": "small_cnn", "weights_uri": uri})
    assert failed_once(run_job(api, spec)) == f"model.weights_uri {uri} does not exist or cannot be read (404)"


def test_empty_weights_fail_once_with_a_reason(api: httpx.Client, storage: Storage):
    uri = put(storage, "tests/faults/empty-weights.pt", b"")
    spec = fast_digits_spec(epochs=1, model={"arch": "small_cnn", "weights_uri": uri})
    assert failed_once(run_job(api, spec)) == f"model.weights_uri {uri} is an empty file (0 bytes)"


def test_a_diverging_job_fails_at_its_step_and_keeps_no_non_finite_checkpoint(
    api: httpx.Client, storage: Storage, stack, tmp_path: Path
):
    # The case: SGD with a large lr on a regression table. Losses: 1.9e4, 2.3e9, 2.0e29, inf.
    stack.seed_tables()
    spec = csv_spec(
        "s3://trainq/tables/diabetes.csv",
        dataset={"type": "csv", "uri": "s3://trainq/tables/diabetes.csv", "target": "target", "task": "regression"},
        model={"arch": "mlp", "hidden_sizes": [32]},
        optimizer={"name": "sgd", "lr": 1.0},
        epochs=3,
        batch_size=32,
        checkpoint={"every_epochs": 1, "every_steps": 2, "best_metric": "val_r2"},
    )
    job = run_job(api, spec)
    prefix = f"s3://trainq/jobs/{job['id']}"
    assert failed_once(job) == f"loss became inf at step 4, epoch 1; last finite checkpoint: {prefix}/checkpoints/step-000000002.pt " \
        "(lower optimizer.lr, or set grad_clip_norm)"
    names = {obj.key.rsplit("/", 1)[-1] for obj in storage.list_objects(f"{prefix}/checkpoints/")}
    assert names == {"step-000000002.pt"}  # no final.pt, no best.pt
    checkpoint = load_checkpoint(storage.download_file(f"{prefix}/checkpoints/step-000000002.pt", tmp_path / "c.pt"))
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert storage.list_objects(f"{prefix}/tensorboard/"), "the events up to the failure are uploaded"
    assert all(math.isfinite(value) for value in job["progress"]["val_metrics"].values())


def test_a_last_batch_of_one_never_reaches_batchnorm(api: httpx.Client, storage: Storage, tmp_path: Path):
    # The issue's case: 33 training images, batch_size 32, resnet18: "Expected more than 1 value
    # per channel when training", 3 attempts. With drop_last "auto" the batch of 1 is dropped.
    root = tmp_path / "images"
    for cls, shade in (("dark", 40), ("light", 200)):
        (root / cls).mkdir(parents=True)
        for index in range(20):
            Image.new("RGB", (32, 32), (shade, index, 0)).save(root / cls / f"{index}.png")
    storage.upload_dir(root, "s3://trainq/tests/faults/forty/")
    spec = fast_digits_spec(epochs=1, batch_size=32, num_workers=0, model={"arch": "resnet18"})
    spec["dataset"] = {"uri": "s3://trainq/tests/faults/forty/", "image_size": 32, "channels": 3, "val_fraction": 0.175}
    job = run_job(api, spec)
    assert job["state"] == "succeeded" and job["attempts"] == 1, job["error"]
    assert job["dataset"]["num_train"] == 33 and job["progress"]["steps_per_epoch"] == 1
