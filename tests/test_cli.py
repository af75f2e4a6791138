"""The ``trainq`` command line against the real session stack (Typer's CliRunner in-process; the
commands that start servers as subprocesses)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shared.records import JobRecord, JobState, Transition
from shared.spec import JobSpec
from tests.conftest import ADMIN_TOKEN
from tests.fixtures import REPO, fast_digits_spec
from trainq.cli import ExitStatus, _status_rows, app
from trainq.client import Client
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
    # Through the API with the admin token (it needed REDIS_URL and direct Redis access before).
    created = trainq(env | {"TRAINQ_TOKEN": ADMIN_TOKEN}, "token", "create", "--owner", owner)
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


def test_demo_trains_through_a_stack_of_its_own(spec_file: Path, tmp_path: Path, monkeypatch):
    clean = {k: None for k in ("REDIS_URL", "S3_ENDPOINT_URL", "S3_ENDPOINT", "TRAINQ_URL", "TRAINQ_TOKEN")}
    one_epoch = tmp_path / "one-epoch.json"
    one_epoch.write_text(json.dumps(json.loads(spec_file.read_text()) | {"epochs": 1}))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    result = CliRunner().invoke(app, ["demo", "--spec", str(one_epoch), "--out", str(tmp_path / "out"), "--min-accuracy", "0"],
                                env=clean, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    job_id = next(line.split()[2] for line in result.stdout.splitlines() if line.startswith("4/5 job "))
    assert (tmp_path / "out" / job_id / "checkpoints" / "final.pt").exists()
    # Off a terminal it says what happens while it waits (it was silent for ~40 s) and leaves no
    # stack folder behind (7.8 MB a run; issue 20 items 6 and 8).
    lines = result.stdout.splitlines()
    assert "queued" in lines and any(line.startswith("running on worker1@") for line in lines), lines
    assert any(line.startswith("epoch 1/1 ") for line in lines), lines
    assert list((tmp_path / "tmp").iterdir()) == []


def submit_parked(env, spec_file: Path, tmp_path: Path, **fields) -> str:
    """Submit the spec to a queue no worker consumes (the job stays queued); return its id."""
    path = tmp_path / f"parked-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(json.loads(spec_file.read_text()) | {"queue": PARKED} | fields))
    result = trainq(env, "submit", str(path), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["id"]


HOSTILE_NAMES = ["[/]", "[link=https://evil.example/]click me[/link]", "[bold red]loud :smile:"]


@pytest.mark.parametrize("on_a_terminal", [False, True])
def test_job_names_print_as_themselves(env, spec_file: Path, tmp_path: Path, on_a_terminal: bool):
    # A job named `[/]` made `trainq list` and `status` exit 1 (Rich's MarkupError), and a
    # `[link=…]` name drew a hidden hyperlink on a terminal (issue 17).
    run_env = env | ({"FORCE_COLOR": "1", "COLUMNS": "250"} if on_a_terminal else {})
    ids = [submit_parked(env, spec_file, tmp_path, name=name) for name in HOSTILE_NAMES]
    try:
        listed = trainq(run_env, "list", "--limit", "500")
        assert listed.exit_code == 0, listed.output
        for job_id, name in zip(ids, HOSTILE_NAMES):
            assert name in listed.stdout
            status = trainq(run_env, "status", job_id)
            assert status.exit_code == 0, status.output
            assert name in status.stdout
            assert "\x1b]8;" not in listed.stdout + status.stdout  # no hyperlink anywhere
    finally:
        for job_id in ids:
            trainq(env, "cancel", job_id)


def test_commands_that_wait_exit_with_how_the_job_ended(env, spec_file: Path, tmp_path: Path):
    # `logs --follow` exited 0 for a failed or cancelled job (issue 19 item 5).
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps(json.loads(spec_file.read_text()) | {
        "dataset": {"type": "image_folder", "uri": "s3://trainq/datasets/nothing-here/", "image_size": 8, "channels": 1}}))
    failed = trainq(env, "submit", str(failing), "--wait")
    assert failed.exit_code == ExitStatus.JOB_FAILED == 3, failed.output
    job_id = failed.stdout.split()[1]
    followed = trainq(env, "logs", job_id, "--follow")
    assert followed.exit_code == ExitStatus.JOB_FAILED and f"-- job {job_id} failed: " in followed.stderr
    parked = submit_parked(env, spec_file, tmp_path)
    assert trainq(env, "cancel", parked).exit_code == 0
    followed = trainq(env, "logs", parked, "--follow")
    assert followed.exit_code == ExitStatus.JOB_CANCELLED == 4 and f"-- job {parked} cancelled" in followed.stderr


def test_short_ids_work_in_every_command(env, waited, spec_file: Path, tmp_path: Path):
    _, job_id = waited
    short = job_id[:8]
    status = trainq(env, "status", short)
    assert status.exit_code == 0 and job_id in status.stdout
    assert trainq(env, "logs", short).stdout == trainq(env, "logs", job_id).stdout
    followed = trainq(env, "logs", short, "--follow")
    assert followed.exit_code == 0 and f"-- job {job_id} succeeded" in followed.stderr
    downloaded = trainq(env, "artifacts", short, "--download", str(tmp_path))
    assert downloaded.exit_code == 0 and (tmp_path / job_id / "checkpoints" / "final.pt").exists()
    assert f"files in {tmp_path.resolve() / job_id}/" in downloaded.stdout
    parked = submit_parked(env, spec_file, tmp_path)
    cancelled = trainq(env, "cancel", parked[:7])
    assert cancelled.stdout.strip() == f"job {parked} cancelled"
    # The readable status of a cancelled job says why (only --json had it).
    status = trainq(env, "status", parked[:7])
    assert re.search(r"^\s*reason\s+cancelled by request\s*$", status.stdout, re.M), status.stdout


def test_the_python_client_downloads_as_the_cli_does(env, waited, tmp_path: Path):
    _, job_id = waited
    with Client(env["TRAINQ_URL"], env["TRAINQ_TOKEN"]) as client:
        record = client.get(job_id[:8])
        assert str(record.state) == "succeeded" and record.state is JobState.SUCCEEDED
        paths = client.download_artifacts(job_id, tmp_path)
    # Into out/<id>/ as `trainq artifacts ID --download out`: two jobs' files never mix.
    assert (tmp_path / job_id / "checkpoints" / "final.pt") in paths
    assert all(path.is_relative_to(tmp_path / job_id) for path in paths)


def test_token_errors_speak_cli(env):
    anonymous = trainq(env | {"TRAINQ_TOKEN": ""}, "list")
    assert anonymous.exit_code == 1 and "set TRAINQ_TOKEN=<token>, or give it before the command (`trainq --token <token> COMMAND`)" in anonymous.stderr
    assert "Authorization: Bearer" not in anonymous.stderr
    wrong = trainq(env | {"TRAINQ_TOKEN": "tq_nothing"}, "list")
    assert wrong.exit_code == 1 and wrong.stderr.startswith("error: 401 invalid or revoked bearer token (the token from TRAINQ_TOKEN")
    late = CliRunner().invoke(app, ["list", "--token", "x"], env=env)
    assert late.exit_code == 2 and "--token goes before the command" in late.output


def test_tokens_are_managed_through_the_api_by_admins_only(env):
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    admin = env | {"TRAINQ_TOKEN": ADMIN_TOKEN}
    refused = trainq(env, "token", "create", "--owner", owner)
    assert refused.exit_code == 1 and refused.stderr.startswith("error: 403 only an admin manages tokens")
    token = trainq(admin, "token", "create", "--owner", owner).stdout.strip()
    assert trainq(env | {"TRAINQ_TOKEN": token}, "list").exit_code == 0
    listed = json.loads(trainq(admin, "token", "list", "--json").stdout)
    assert owner in [info["owner"] for info in listed] and all("token" not in info for info in listed)
    revoked = trainq(admin, "token", "revoke", "--owner", owner)
    assert revoked.exit_code == 0 and f"(owner {owner})" in revoked.stdout
    assert trainq(env | {"TRAINQ_TOKEN": token}, "list").exit_code == 1


def test_the_log_says_what_the_job_does_before_training(env, waited):
    # A first job's log was silent for the 20 s of its download (issue 20 item 6).
    _, job_id = waited
    log = trainq(env, "logs", job_id).stdout
    assert f"job {job_id}: downloading" in log and f"job {job_id}: building model" in log, log[:2000]
    assert log.index(f"job {job_id}: downloading") < log.index(f"job {job_id}: building model") < log.index("epoch 1/2")


def test_status_of_a_preempted_job_shows_its_priority_reason_and_history():
    now = time.time()
    steps = [(JobState.QUEUED, None), (JobState.RUNNING, None), (JobState.PREEMPTED, "preempted at step 7")]
    record = JobRecord(
        id="j-preempted", state=JobState.PREEMPTED, queue="default", created_at=now,
        spec=JobSpec.model_validate(fast_digits_spec(priority=30)),
        transitions=[Transition(state=state, at=now, reason=reason) for state, reason in steps],
    )
    rows = dict(_status_rows(record))
    assert rows["priority"] == "30" and rows["reason"] == "preempted at step 7"
    assert rows["history"] == "queued → running → preempted (preempted at step 7)"


# -- found by a fresh-user pass (2026-12-04) ------------------------------------------------------
def test_a_server_that_is_not_trainq_is_named_not_printed(env, tmp_path: Path):
    # With port 8000 taken by another server and TRAINQ_URL forgotten, the CLI printed its HTML page.
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        result = trainq({**env, "TRAINQ_URL": url}, "list")
        assert result.exit_code == ExitStatus.ERROR
        assert "is not a trainq API" in result.stderr and "TRAINQ_URL" in result.stderr
        assert "<html" not in result.output.lower()
    finally:
        other.terminate()
        other.wait(10)


def test_a_string_no_encoder_takes_gets_the_apis_422(env, tmp_path: Path):
    spec = tmp_path / "surrogate.json"
    spec.write_text(json.dumps({**fast_digits_spec(epochs=1), "name": "\ud800"}))  # a lone surrogate, as JSON allows
    result = trainq(env, "submit", str(spec))
    assert result.exit_code == ExitStatus.ERROR and "UnicodeEncodeError" not in result.output
    assert result.stderr.startswith("error: 422 name:"), result.stderr


def test_a_prefix_shorter_than_six_digits_says_so(env, waited):
    _, job_id = waited
    result = trainq(env, "status", job_id[:4])
    assert result.exit_code == ExitStatus.ERROR and "at least 6 hex digits" in result.stderr


def test_list_says_when_more_jobs_than_shown(env, waited):
    result = trainq(env, "list", "--limit", "1")
    assert result.exit_code == 0 and "the newest 1 shown; more with --limit N" in result.stderr


def test_a_download_folder_that_cannot_be_written_is_one_line(env, waited, tmp_path: Path):
    _, job_id = waited
    (tmp_path / "a-file").write_text("")
    result = trainq(env, "artifacts", job_id, "--download", str(tmp_path / "a-file"))
    assert result.exit_code == ExitStatus.ERROR and result.stderr.startswith("error: cannot write ")
    assert "unexpected" not in result.stderr


def test_tensorboard_on_a_bad_or_taken_port_says_so(env, waited):
    _, job_id = waited
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    assert trainq({**env, **aws}, "tensorboard", job_id, "--port", "99999").exit_code == ExitStatus.USAGE
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = trainq({**env, **aws}, "tensorboard", job_id, "--port", str(port))
    assert result.exit_code == ExitStatus.ERROR and f"cannot listen on 127.0.0.1:{port}" in result.stderr
