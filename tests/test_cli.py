"""The ``trainq`` command line against the real session stack (Typer's CliRunner in-process; the
commands that start servers as subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.fixtures import REPO, fast_digits_spec
from trainq.cli import app
from trainq.stack import LocalStack, free_port

PARKED = "test-nobody-listens"


@pytest.fixture(scope="module")
def env(stack: LocalStack, api_token: str) -> dict[str, str]:
    """What a user exports: the API's address and their token."""
    return {"TRAINQ_URL": stack.api_url, "TRAINQ_TOKEN": api_token}


def trainq(env: dict[str, str], *args: str):
    """Run ``trainq args…`` in-process (not on a terminal); return Click's result."""
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("specs") / "fast.json"
    path.write_text(json.dumps(fast_digits_spec(epochs=2, batch_size=256, num_workers=0, name="cli-job")))
    return path


@pytest.fixture(scope="module")
def waited(env: dict[str, str], spec_file: Path):
    """`trainq submit spec --wait`, run once: (result, job id)."""
    result = trainq(env, "submit", str(spec_file), "--wait")
    job_id = result.stdout.split()[1]
    return result, job_id


def test_submit_wait_prints_a_line_per_epoch_off_a_terminal(waited):
    result, job_id = waited
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"job {job_id} submitted to queue default"
    epochs = [line for line in lines if line.startswith("epoch ")]
    # A line per epoch the once-a-second poll sees validated; an epoch shorter than a poll can fold
    # into the next line, but the lines count up and end with the last epoch.
    seen = [line.split()[1] for line in epochs]
    assert seen in (["1/2", "2/2"], ["2/2"]), seen
    assert all("loss " in line and "val_accuracy " in line and "ETA " in line for line in epochs)
    summary = next(line for line in lines if line.startswith(f"job {job_id} succeeded on cpu: 2 epochs"))
    # The last epoch's line shows that epoch's validation, not the one before (a fresh user saw
    # "epoch 10/10" printed with epoch 9's val_accuracy while epoch 10 still validated).
    final_accuracy = summary.split("val_accuracy ")[1].split(",")[0]
    assert f"val_accuracy {final_accuracy}" in epochs[-1]
    assert f"final checkpoint s3://trainq/jobs/{job_id}/checkpoints/final.pt" in lines


def test_submit_dry_run_checks_without_queueing(env, spec_file: Path, tmp_path: Path):
    before = json.loads(trainq(env, "list", "--json", "--limit", "500").stdout)
    result = trainq(env, "submit", str(spec_file), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dry run ok: classification, 10 classes, input [1, 8, 8]")
    report = json.loads(trainq(env, "submit", str(spec_file), "--dry-run", "--json").stdout)
    assert report["batch_shape"][1:] == [1, 8, 8] and report["num_outputs"] == 10
    assert len(json.loads(trainq(env, "list", "--json", "--limit", "500").stdout)) == len(before)  # nothing queued
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(fast_digits_spec(dataset={"type": "image_folder", "uri": "s3://trainq/datasets/nothing-here/", "image_size": 8, "channels": 1})))
    result = trainq(env, "submit", str(bad), "--dry-run")
    assert result.exit_code == 1 and "s3://trainq/datasets/nothing-here/" in result.output


def test_list_status_and_json(env, waited):
    _, job_id = waited
    listed = trainq(env, "list", "--state", "succeeded", "--limit", "500")
    assert listed.exit_code == 0 and job_id in listed.stdout and "cli-job" in listed.stdout
    rows = json.loads(trainq(env, "list", "--state", "succeeded", "--json", "--limit", "500").stdout)
    assert job_id in [row["id"] for row in rows] and all(row["state"] == "succeeded" for row in rows)
    assert "cli-job" not in trainq(env, "list", "--state", "failed").stdout
    status = trainq(env, "status", job_id)
    assert status.exit_code == 0 and "succeeded" in status.stdout and "epoch 2/2" in status.stdout
    assert json.loads(trainq(env, "status", job_id, "--json").stdout)["id"] == job_id


def test_logs_and_follow(env, waited):
    _, job_id = waited
    logs = trainq(env, "logs", job_id)
    assert logs.exit_code == 0 and logs.stdout.startswith(f"trainq: job {job_id}, attempt 1")
    assert "epoch 2/2 val_loss" in logs.stdout
    followed = trainq(env, "logs", job_id, "--follow")
    assert followed.exit_code == 0 and followed.stdout == logs.stdout
    assert f"-- job {job_id} succeeded" in followed.stderr


def test_artifacts_list_json_and_download(env, waited, tmp_path: Path):
    _, job_id = waited
    table = trainq(env, "artifacts", job_id)
    assert "checkpoints/final.pt" in table.stdout and "logs/attempt-1.log" in table.stdout
    listing = json.loads(trainq(env, "artifacts", job_id, "--json").stdout)
    assert all(item["url"].startswith("http") for item in listing["files"]) and listing["expires_in_s"] == 3600
    downloaded = trainq(env, "artifacts", job_id, "--download", str(tmp_path))
    assert downloaded.exit_code == 0, downloaded.output
    for item in listing["files"]:
        assert (tmp_path / job_id / item["path"]).stat().st_size == item["size_bytes"]


def test_cancel_a_queued_job_then_409_as_one_line(env, spec_file: Path, tmp_path: Path):
    parked = tmp_path / "parked.json"
    parked.write_text(json.dumps(json.loads(spec_file.read_text()) | {"queue": PARKED}))
    submitted = json.loads(trainq(env, "submit", str(parked), "--json").stdout)
    assert submitted["state"] == "queued"
    cancelled = trainq(env, "cancel", submitted["id"])
    assert cancelled.exit_code == 0 and cancelled.stdout.strip() == f"job {submitted['id']} cancelled"
    again = trainq(env, "cancel", submitted["id"])
    assert again.exit_code == 1 and again.stderr == f"error: 409 job {submitted['id']} is already cancelled; nothing to cancel\n"


def test_workers_and_queues(env):
    workers = trainq(env, "workers")
    assert workers.exit_code == 0 and "worker1@" in workers.stdout and "default" in workers.stdout
    assert json.loads(trainq(env, "workers", "--json").stdout)[0]["device"]["cuda_available"] in (True, False)
    queues = json.loads(trainq(env, "queues", "--json").stdout)
    assert "default" in [queue["name"] for queue in queues["data"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "no-such-job"], "error: 404 job 'no-such-job' not found"),
        (["submit", "missing.json"], "error: spec file missing.json does not exist"),
        (["logs", "no-such-job"], "error: 404 job 'no-such-job' not found"),
    ],
)
def test_errors_are_one_line_and_exit_1(env, args, message):
    result = trainq(env, *args)
    assert result.exit_code == 1 and result.stderr == message + "\n" and result.stdout == ""


def test_refused_specs_name_the_field(env, tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(fast_digits_spec() | {"optimizer": {"name": "adam", "lr": -1}}))
    result = trainq(env, "submit", str(bad))
    assert result.exit_code == 1 and result.stderr.startswith("error: 422 optimizer.lr: Input should be greater than 0")
    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset": \n  {"uri": }')
    result = trainq(env, "submit", str(broken))
    assert result.exit_code == 1 and result.stderr == f"error: spec file {broken} is not JSON: line 2 column 11: Expecting value\n"


def test_no_api_or_no_token_is_one_line(env):
    down = trainq(env | {"TRAINQ_URL": f"http://127.0.0.1:{free_port()}"}, "list")
    assert down.exit_code == 1 and down.stderr.startswith("error: cannot reach the trainq API at http://127.0.0.1:")
    assert down.stderr.count("\n") == 1
    anonymous = trainq(env | {"TRAINQ_TOKEN": ""}, "list")
    assert anonymous.exit_code == 1 and anonymous.stderr.startswith("error: 401 a bearer token is required")


def test_token_create_issues_a_working_token(env, stack: LocalStack):
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    created = trainq(env | {"REDIS_URL": stack.env["REDIS_URL"]}, "token", "create", "--owner", owner)
    assert created.exit_code == 0
    token = created.stdout.strip()
    assert trainq(env | {"TRAINQ_TOKEN": token}, "list").stdout.strip() == "no jobs"


def test_tensorboard_serves_the_jobs_run_from_s3(env, waited, stack: LocalStack, tmp_path: Path):
    _, job_id = waited
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "trainq.cli", "tensorboard", job_id, "--port", str(port)],
        env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        | env | {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, runs = time.monotonic() + 90, {}
        while time.monotonic() < deadline and not runs:
            try:
                runs = httpx.get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        assert any("train/loss" in tags for tags in runs.values()), runs
    finally:
        process.terminate()  # SIGTERM to the CLI's own pid, as a supervisor sends it: TensorBoard must go too
        try:
            output = process.communicate(timeout=30)[0].decode()  # a TensorBoard child would hold stdout open
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=5)  # nothing left serving the port
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
            except ProcessLookupError:
                pass
    assert f"TensorBoard on s3://trainq/jobs/{job_id}/tensorboard/" in output


def test_tensorboard_without_credentials_says_what_to_set(env):
    result = CliRunner().invoke(app, ["tensorboard"], env=env | {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                                                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                                                                 "AWS_EC2_METADATA_DISABLED": "true"})
    assert result.exit_code == 1 and "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.stderr


def test_up_runs_the_local_stack_until_interrupted(tmp_path: Path):
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "S3_ENDPOINT_URL", "S3_ENDPOINT")}
    process = subprocess.Popen(
        [sys.executable, "-m", "trainq.cli", "up", "--port", str(port), "--no-seed", "--workdir", str(tmp_path)],
        env=clean, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, ready = time.monotonic() + 180, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).json()
                if ready.get("workers"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        assert ready and ready["status"] == "ready" and ready["workers"] == 1, ready
    finally:
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert "stopping" in output


def test_demo_trains_through_a_stack_of_its_own(spec_file: Path, tmp_path: Path):
    clean = {k: None for k in ("REDIS_URL", "S3_ENDPOINT_URL", "S3_ENDPOINT", "TRAINQ_URL", "TRAINQ_TOKEN")}
    one_epoch = tmp_path / "one-epoch.json"
    one_epoch.write_text(json.dumps(json.loads(spec_file.read_text()) | {"epochs": 1}))
    result = CliRunner().invoke(app, ["demo", "--spec", str(one_epoch), "--out", str(tmp_path / "out"), "--min-accuracy", "0"],
                                env=clean, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    job_id = next(line.split()[2] for line in result.stdout.splitlines() if line.startswith("4/5 job "))
    assert (tmp_path / "out" / job_id / "checkpoints" / "final.pt").exists()
