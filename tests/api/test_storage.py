"""``GET /storage`` and ``trainq storage`` on the real stack: the bytes an owner's jobs hold in S3."""

from __future__ import annotations

import time
import uuid

import httpx
from typer.testing import CliRunner

from shared.joblogs import COMPLETE_METADATA, log_uri
from shared.jobs import JobStore
from shared.owner_storage import measure_owner_storage
from shared.spec import JobSpec
from shared.storage import Storage, parse_s3_uri
from tests.conftest import ADMIN_TOKEN, wait_for_job
from tests.fixtures import example_spec, fast_digits_spec
from trainq.cli import app
from trainq.stack import LocalStack


def owner_client(stack: LocalStack, owner: str) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {stack.create_token(owner)}"})


def wait_for_complete_log(storage: Storage, job_id: str, timeout_s: float = 60) -> None:
    """Wait until the job's last log upload is marked complete (the worker uploads it just after the final state)."""
    bucket, key = parse_s3_uri(log_uri(storage, job_id, 1))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if storage.client.head_object(Bucket=bucket, Key=key)["Metadata"].get(COMPLETE_METADATA) == "true":
                return
        except storage.client.exceptions.ClientError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"job {job_id}: log not complete after {timeout_s} s")


def test_an_owners_storage_counts_its_finished_jobs_bytes_and_falls_when_a_checkpoint_is_deleted(
    stack: LocalStack, storage: Storage,
):
    owner = f"storage-{uuid.uuid4().hex[:8]}"
    with owner_client(stack, owner) as api:
        assert api.get("/storage").raise_for_status().json() == {"owner": owner, "bytes": 0, "objects": 0, "jobs": 0, "jobs_total": 0}
        spec = fast_digits_spec(epochs=1, checkpoint={"every_steps": 5, "keep_last": 2})
        job_id = api.post("/jobs", json=spec).raise_for_status().json()["id"]
        record = wait_for_job(api, job_id)
        assert record["state"] == "succeeded", record["error"]
        wait_for_complete_log(storage, job_id)
        files = api.get(f"/jobs/{job_id}/artifacts").raise_for_status().json()["files"]
        measured = api.get("/storage").raise_for_status().json()
        assert measured == {"owner": owner, "bytes": sum(f["size_bytes"] for f in files), "objects": len(files), "jobs": 1, "jobs_total": 1}
        kinds = {f["path"].split("/", 1)[0] for f in files}
        assert {"checkpoints", "tensorboard", "logs"} <= kinds and measured["bytes"] > 0
        steps = [f for f in files if f["path"].startswith("checkpoints/step-")]
        assert len(steps) == 2  # keep_last deleted the older step checkpoints: they are not counted
        storage.delete(steps[0]["uri"])  # as retention deletes a checkpoint once a newer one is uploaded
        after = api.get("/storage").raise_for_status().json()
        assert after["bytes"] == measured["bytes"] - steps[0]["size_bytes"] and after["objects"] == len(files) - 1


def test_only_an_admin_reads_another_owners_storage(stack: LocalStack):
    owner = f"storage-{uuid.uuid4().hex[:8]}"
    with owner_client(stack, owner) as api, owner_client(stack, f"other-{uuid.uuid4().hex[:8]}") as other:
        api.post("/jobs", json=example_spec() | {"queue": "test-nobody-listens"}).raise_for_status()
        assert api.get("/storage", params={"owner": owner}).json()["jobs"] == 1
        refused = other.get("/storage", params={"owner": owner})
        assert refused.status_code == 403 and owner in refused.json()["detail"]
        assert other.get("/storage", params={"bogus": 1}).status_code == 422
        with httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            assert admin.get("/storage", params={"owner": owner}).json() == {
                "owner": owner, "bytes": 0, "objects": 0, "jobs": 1, "jobs_total": 1}


def test_trainq_storage_prints_the_figure(stack: LocalStack):
    owner = f"storage-{uuid.uuid4().hex[:8]}"
    token = stack.create_token(owner)
    result = CliRunner().invoke(app, ["--url", stack.api_url, "--token", token, "storage"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{owner}: 0 bytes (0.00 GiB) in 0 objects of 0 jobs"
    refused = CliRunner().invoke(app, ["--url", stack.api_url, "--token", token, "storage", "--owner", "someone-else"])
    assert refused.exit_code == 1 and "only an admin may read another owner's storage" in refused.output


def test_the_measure_is_bounded_to_the_newest_jobs(stack: LocalStack, storage: Storage, tmp_path):
    store = JobStore.from_url(stack.env["REDIS_URL"])
    owner = f"storage-{uuid.uuid4().hex[:8]}"
    spec = JobSpec.model_validate(example_spec())
    (old, _), (new, _) = store.create(spec, "test-nobody-listens", owner=owner), store.create(spec, "test-nobody-listens", owner=owner)
    for job, size in ((old, 3), (new, 5)):
        (tmp_path / job.id).write_bytes(b"x" * size)
        storage.upload_file(tmp_path / job.id, storage.job_uri(job.id, "checkpoints", "step-000000001.pt"))
    assert measure_owner_storage(store, storage, owner).model_dump() == {
        "owner": owner, "bytes": 8, "objects": 2, "jobs": 2, "jobs_total": 2}
    assert measure_owner_storage(store, storage, owner, max_jobs=1).model_dump() == {
        "owner": owner, "bytes": 5, "objects": 1, "jobs": 1, "jobs_total": 2}
