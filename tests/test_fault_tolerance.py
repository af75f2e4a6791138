"""Fault injection on the real stack: kill -9 of the training worker, re-delivery, cancel, time
limits, S3 down, Redis restarted. Every job must end once, in the right state, and a resumed job
must end with weights bit-identical to an uninterrupted run.

The stack here has a short lease (2 s) so dead workers are noticed within seconds, and its
workers reach S3 through a proxy the tests can slow down or take down.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import pytest
import redis
import torch

from shared.storage import Storage
from tests.conftest import wait_for_job
from tests.faults import FaultyProxy
from tests.fixtures import DIGITS_URI, fast_digits_spec
from tests.test_end_to_end import read_tensorboard
from worker.training.checkpoint import load_checkpoint
from trainq.stack import LocalStack

FAST_FAILURE_ENV = {
    "LEASE_TTL_S": "2",
    "REAPER_INTERVAL_S": "0.5",
    "PROGRESS_INTERVAL_S": "0.2",
    "CANCEL_POLL_INTERVAL_S": "0.2",
    "TENSORBOARD_UPLOAD_INTERVAL_S": "1",
    "UPLOAD_DEADLINE_S": "120",
    "QUEUES": "default,nobody-listens",
    # These tests compare separate jobs bit for bit: pin the threads rather than let each job's
    # probe measure a loaded CI machine (a resume reuses its own count: tests/worker/test_cpu.py).
    "TORCH_THREADS": "1",
}


def resumable_spec(**overrides) -> dict:
    """3 epochs of 45 steps, a checkpoint every 20 steps, two DataLoader workers."""
    spec = fast_digits_spec(epochs=3, batch_size=32, num_workers=2, checkpoint={"every_epochs": 1, "every_steps": 20})
    spec.update(overrides)
    return spec


class FaultStack:
    """The stack, the proxy in front of its S3 server, and helpers to start and kill workers."""

    def __init__(self, stack: LocalStack, proxy: FaultyProxy) -> None:
        self.stack, self.proxy = stack, proxy
        self.api = httpx.Client(base_url=stack.api_url, timeout=30)
        self.storage = Storage(stack.settings)
        self._count = 0

    def start_worker(self, **env: str) -> str:
        self._count += 1
        name = f"fw{self._count}"
        self.stack.start_worker(name, env={"S3_ENDPOINT_URL": self.proxy.url, **env})
        return name

    def kill(self, name: str) -> None:
        """kill -9 the worker process (the process that trains; its DataLoader workers follow)."""
        assert self.stack.stop_process(name, signal.SIGKILL) == -signal.SIGKILL

    def submit(self, spec: dict) -> str:
        response = self.api.post("/jobs", json=spec)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def get(self, job_id: str) -> dict:
        return self.api.get(f"/jobs/{job_id}").raise_for_status().json()

    def wait_until(self, job_id: str, predicate, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.get(job_id)
            if predicate(record):
                return record
            time.sleep(0.05)
        raise AssertionError(f"job {job_id}: condition not met in {timeout_s} s: {record}")

    def final_state_dict(self, job_id: str, tmp_path: Path) -> dict:
        record = self.get(job_id)
        path = self.storage.download_file(record["artifacts"]["final_checkpoint"], tmp_path / f"{job_id}.pt")
        return load_checkpoint(path)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    stack = LocalStack(tmp_path_factory.mktemp("fault-stack"), workers=0, env=FAST_FAILURE_ENV, isolated=True)
    with stack:
        assert {"redis", "s3"} <= set(stack.processes), "the fault stack must not share servers with another stack"
        s3 = urlparse(stack.env["S3_ENDPOINT_URL"])
        proxy = FaultyProxy(s3.hostname, s3.port)
        stack.seed_digits(DIGITS_URI)
        fs = FaultStack(stack, proxy)
        try:
            yield fs
        finally:
            fs.api.close()
            proxy.close()


@pytest.fixture(scope="module")
def reference(faults: FaultStack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Final checkpoint of an uninterrupted run of :func:`resumable_spec`."""
    worker = faults.start_worker()
    job_id = faults.submit(resumable_spec())
    record = wait_for_job(faults.api, job_id)
    faults.stack.stop_process(worker)
    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 1
    return faults.final_state_dict(job_id, tmp_path_factory.mktemp("reference"))


def assert_bit_identical(got: dict, expected: dict) -> None:
    assert got["step"] == expected["step"] and got["epoch"] == expected["epoch"]
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), f"model.{name} differs"
    for index, state in expected["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(got["optimizer"]["state"][index][key], tensor), f"optimizer.state[{index}].{key} differs"


@pytest.mark.parametrize("kill_point", ["before_first_checkpoint", "mid_epoch", "mid_checkpoint_upload", "sigterm"])
def test_killed_worker_resumes_exactly_once_bit_identical(faults: FaultStack, reference: dict, kill_point: str, tmp_path: Path):
    victim = faults.start_worker()
    job_id = faults.submit(resumable_spec())
    if kill_point == "before_first_checkpoint":
        # Hold every checkpoint upload back, and kill once this attempt's TensorBoard events are
        # in S3: the next attempt starts from scratch and must hide them (each step shown once).
        # 2 s per 16 KiB: no checkpoint can land between the events and the kill, however loaded
        # the machine (at the default 0.05 s one did once, under load, and the job resumed from it).
        faults.proxy.slow_marker, faults.proxy.slow_delay_s = f"/jobs/{job_id}/checkpoints/".encode(), 2.0
        faults.wait_until(job_id, lambda r: faults.storage.list_objects(f"s3://trainq/jobs/{job_id}/tensorboard/"))
    elif kill_point in ("mid_epoch", "sigterm"):
        faults.wait_until(job_id, lambda r: r["progress"]["step"] >= 50 and len(r["artifacts"]["checkpoints"]) >= 2)
    else:
        faults.wait_until(job_id, lambda r: r["state"] == "running")
        faults.proxy.slow_marker = f"/jobs/{job_id}/checkpoints/step-000000040.pt".encode()
        assert faults.proxy.upload_in_flight.wait(60), "the checkpoint upload never started"
    before = faults.get(job_id)
    if kill_point == "sigterm":  # a node drain: the worker checkpoints and hands the job back
        assert faults.stack.stop_process(victim, signal.SIGTERM, timeout_s=60) == 0
        assert faults.get(job_id)["state"] == "retrying"
    else:
        faults.kill(victim)
    faults.proxy.slow_marker, faults.proxy.slow_delay_s = None, 0.05
    rescuer = faults.start_worker()
    record = wait_for_job(faults.api, job_id)
    faults.stack.stop_process(rescuer)

    assert record["state"] == "succeeded", record["error"]
    assert [t["state"] for t in record["transitions"]] == ["queued", "running", "retrying", "running", "succeeded"]
    reason = record["transitions"][2]["reason"]
    assert record["attempts"] == 2 and ("shut down at step" if kill_point == "sigterm" else "no heartbeat") in reason
    checkpoints_before = before["artifacts"]["checkpoints"]
    if kill_point == "before_first_checkpoint":
        assert checkpoints_before == [] and record["resumed_from"] is None
    elif kill_point == "mid_epoch":
        assert record["resumed_from"] is not None and record["resumed_from"] in checkpoints_before
    elif kill_point == "sigterm":
        stopped_at = int(reason.rsplit(" ", 1)[1])
        assert record["resumed_from"].endswith(f"step-{stopped_at:09d}.pt")  # saved where it stopped
    else:
        # The interrupted upload left nothing: the resume used the checkpoint before it.
        assert record["resumed_from"].endswith("step-000000020.pt")
    assert_bit_identical(faults.final_state_dict(job_id, tmp_path), reference)
    events = read_tensorboard(record["artifacts"]["tensorboard"].rstrip("/"), faults.stack.env)
    assert [step for step, _ in events["scalars"]["train/loss"]] == list(range(1, 136))


def test_redelivery_after_visibility_timeout_runs_the_job_once(faults: FaultStack, storage_listing=None):
    # Two workers whose broker re-delivers any message unacknowledged for 2 s; the job runs ~10 s
    # (8 epochs: at 4 a faster engine once finished before kombu's restore of unacked messages ran).
    workers = [faults.start_worker(VISIBILITY_TIMEOUT_S="2") for _ in range(2)]
    job_id = faults.submit(resumable_spec(epochs=8, checkpoint={"every_epochs": 1}))
    record = wait_for_job(faults.api, job_id)
    for worker in workers:
        faults.stack.stop_process(worker)
    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 1
    assert record["duplicate_deliveries"] >= 1, "the broker never re-delivered: the test proved nothing"
    assert [t["state"] for t in record["transitions"]] == ["queued", "running", "succeeded"]
    keys = [obj.key for obj in faults.storage.list_objects(f"s3://trainq/jobs/{job_id}/")]
    assert len([k for k in keys if "/tensorboard/" in k]) == 1, keys  # one run, one event file
    assert len([k for k in keys if "/checkpoints/" in k]) == 8


def test_cancel_queued_and_running_jobs(faults: FaultStack):
    worker = faults.start_worker()
    running = faults.submit(resumable_spec(epochs=20))
    queued = faults.submit(resumable_spec(epochs=1))
    faults.wait_until(running, lambda r: r["progress"]["step"] >= 5)
    assert faults.get(queued)["state"] == "queued"  # the only worker is busy

    response = faults.api.post(f"/jobs/{queued}/cancel")
    assert response.status_code == 202 and response.json()["state"] == "cancelled"
    asked = time.monotonic()
    assert faults.api.post(f"/jobs/{running}/cancel").json()["cancel_requested_at"] is not None
    record = wait_for_job(faults.api, running, timeout_s=30)
    stopped_after_s = time.monotonic() - asked
    assert record["state"] == "cancelled" and stopped_after_s < 10
    step = record["progress"]["step"]
    assert record["artifacts"]["checkpoints"][-1].endswith(f"step-{step:09d}.pt")  # saved where it stopped
    assert f"at step {step}" in record["transitions"][-1]["reason"]
    events = read_tensorboard(record["artifacts"]["tensorboard"].rstrip("/"), faults.stack.env)
    assert events["scalars"]["train/loss"][-1][0] == step  # events uploaded up to the stop

    # Cancelled while pending (the only worker was busy), it was never sent to a worker at all.
    skipped = wait_for_job(faults.api, queued)
    assert skipped["duplicate_deliveries"] == 0
    assert skipped["attempts"] == 0 and [t["state"] for t in skipped["transitions"]] == ["queued", "cancelled"]
    for job_id in (queued, running):
        conflict = faults.api.post(f"/jobs/{job_id}/cancel")
        assert conflict.status_code == 409 and "already cancelled" in conflict.json()["detail"]
    assert faults.api.post("/jobs/nope/cancel").status_code == 404
    faults.stack.stop_process(worker)


def test_time_limit_saves_a_checkpoint_and_fails(faults: FaultStack):
    worker = faults.start_worker()
    spec = resumable_spec(epochs=50, max_runtime_s=3)
    # The limit counts every phase, download included: a dry run on this worker fetches the data
    # into its cache first, so that the job's 3 s are spent training.
    assert faults.api.post("/jobs", params={"dry_run": "true"}, json=spec, timeout=150).status_code == 200
    job_id = faults.submit(spec)
    record = wait_for_job(faults.api, job_id, timeout_s=60)
    faults.stack.stop_process(worker)
    assert record["state"] == "failed" and record["transitions"][-1]["reason"] == "time limit"
    assert record["error"].startswith("time limit: ran 3.")
    assert 3 <= record["progress"]["runtime_s"] < 6
    step = record["progress"]["step"]
    assert step < 50 * 45 and record["artifacts"]["checkpoints"][-1].endswith(f"step-{step:09d}.pt")


def test_s3_down_for_30_s_mid_job(faults: FaultStack):
    worker = faults.start_worker()
    job_id = faults.submit(resumable_spec())
    faults.wait_until(job_id, lambda r: r["progress"]["step"] >= 10)
    faults.proxy.go_down()
    time.sleep(30)
    record = faults.get(job_id)
    assert record["state"] == "running", "a job must not finish while its artifacts cannot be uploaded"
    faults.proxy.come_back()
    record = wait_for_job(faults.api, job_id, timeout_s=180)
    faults.stack.stop_process(worker)
    assert record["state"] == "succeeded", record["error"]
    assert record["attempts"] == 1
    names = {obj.key.rsplit("/", 1)[-1] for obj in faults.storage.list_objects(f"s3://trainq/jobs/{job_id}/checkpoints/")}
    # Checkpoints due while the outage held one upload were coalesced into the newest of them;
    # the last scheduled one and the final one always land, and the record lists exactly those in S3.
    assert {"step-000000120.pt", "final.pt"} <= names <= {f"step-{s:09d}.pt" for s in (20, 40, 45, 60, 80, 90, 100, 120)} | {"final.pt"}
    assert {uri.rsplit("/", 1)[-1] for uri in record["artifacts"]["checkpoints"]} == names


def test_redis_restart_loses_no_queued_job_and_api_says_503(faults: FaultStack):
    spec = resumable_spec(epochs=1, batch_size=256, num_workers=0)
    job_ids = [faults.submit(spec) for _ in range(3)]  # no worker yet: they stay queued
    faults.stack.stop_process("redis")
    down = faults.api.get("/jobs")
    assert down.status_code == 503 and "job store unavailable" in down.json()["detail"]
    assert faults.api.post("/jobs", json=spec).status_code == 503
    assert faults.api.get("/readyz").status_code == 503
    faults.stack.start_redis()
    worker = faults.start_worker()
    records = [wait_for_job(faults.api, job_id, timeout_s=120) for job_id in job_ids]
    faults.stack.stop_process(worker)
    assert [r["state"] for r in records] == ["succeeded"] * 3
    assert all(r["attempts"] == 1 for r in records)


def test_idempotency_key_returns_the_same_job(faults: FaultStack):
    spec = resumable_spec(queue="nobody-listens")
    first = faults.api.post("/jobs", json=spec, headers={"Idempotency-Key": "order-42"})
    again = faults.api.post("/jobs", json=spec, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = faults.api.post("/jobs", json=spec | {"seed": 1}, headers={"Idempotency-Key": "order-42"})
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    listed = [job["id"] for job in faults.api.get("/jobs", params={"limit": 500}).json()["data"]]
    assert listed.count(first.json()["id"]) == 1
    client = redis.Redis.from_url(faults.stack.env["REDIS_URL"])
    assert len([k for k in client.scan_iter("trainq:idempotency:*")]) == 1


def test_a_job_that_keeps_killing_its_workers_fails_after_the_second_loss(faults: FaultStack):
    # A poison pill (e.g. a spec that runs every worker out of memory: the OOM killer's SIGKILL)
    # must not take down one worker per attempt: the second loss fails it as the job's fault.
    job_id = faults.submit(resumable_spec(epochs=20))
    for attempt in (1, 2):
        victim = faults.start_worker()
        faults.wait_until(job_id, lambda r, attempt=attempt: r["state"] == "running" and r["attempts"] == attempt)
        faults.kill(victim)
    reaper = faults.start_worker()  # reapers run in workers: this one finds the dead attempt
    record = wait_for_job(faults.api, job_id, timeout_s=60)
    faults.stack.stop_process(reaper)
    assert record["state"] == "failed" and record["attempts"] == 2
    assert [t["state"] for t in record["transitions"]] == ["queued", "running", "retrying", "running", "failed"]
    assert record["error"].startswith("worker lost twice while running this job (out of memory?")
    assert record["transitions"][-1]["reason"] == "worker lost twice"


def test_an_unexpected_error_fails_once_naming_its_stage_and_no_worker_path(faults: FaultStack, tmp_path: Path):
    # A worker whose cache cannot hold folders: an internal error, not worth 3 attempts.
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    worker = faults.start_worker(DATA_CACHE_DIR=str(blocker))
    record = wait_for_job(faults.api, faults.submit(resumable_spec(epochs=1)), timeout_s=60)
    faults.stack.stop_process(worker)
    assert record["state"] == "failed" and record["attempts"] == 1, record["error"]
    assert record["transitions"][-1]["reason"] == "internal error"
    assert record["error"].startswith("internal error in download: ") and record["error"].endswith("(traceback in the worker log)")
    assert str(tmp_path) not in record["error"] and "<worker cache>/datasets/" in record["error"]


def test_the_local_stack_restarts_a_worker_that_exits(faults: FaultStack, capsys):
    name = faults.start_worker()
    process = faults.stack.processes[name]
    process.kill()
    process.wait()
    assert faults.stack.restart_exited_workers() == [name]
    assert f"{name} exited with code -9; restarting it" in capsys.readouterr().out
    record = wait_for_job(faults.api, faults.submit(resumable_spec(epochs=1)), timeout_s=120)
    faults.stack.stop_process(name)
    assert record["state"] == "succeeded" and record["worker"].startswith(f"{name}@")


def test_cancel_while_downloading_ends_within_seconds_and_shows_the_phase(faults: FaultStack, tmp_path: Path):
    from trainq.sample_data import write_digits

    write_digits(tmp_path, limit=300)
    uri = "s3://trainq/datasets/slow-download/"
    faults.storage.upload_dir(tmp_path, uri)  # straight to S3, not through the proxy
    faults.proxy.slow_marker, faults.proxy.slow_delay_s = b"/datasets/slow-download/", 1.0  # each GET of it waits 1 s
    worker = faults.start_worker()
    try:
        spec = resumable_spec()
        spec["dataset"] = spec["dataset"] | {"uri": uri}
        job_id = faults.submit(spec)
        faults.wait_until(job_id, lambda r: r["progress"]["phase"] == "downloading" and (r["progress"]["files_done"] or 0) > 0)
        asked = time.monotonic()
        faults.api.post(f"/jobs/{job_id}/cancel").raise_for_status()
        record = wait_for_job(faults.api, job_id, timeout_s=60)
        stopped_after_s = time.monotonic() - asked
    finally:
        faults.proxy.slow_marker, faults.proxy.slow_delay_s = None, 0.05
        faults.stack.stop_process(worker)
    assert record["state"] == "cancelled" and stopped_after_s < 8  # the whole download takes about 20 s
    progress = record["progress"]
    assert progress["phase"] == "downloading" and progress["files_total"] == 300 and 0 < progress["files_done"] < 300
    assert 0 < progress["bytes_done"] < progress["bytes_total"]


# -- a stuck job still stops (worker/watchdog.py) --------------------------------------------

#: A short watchdog bound, so the tests spend seconds, not the default 20 s, per stuck job.
STOP_TIMEOUT_S = 5.0


def _stop_loader_workers(faults: FaultStack, worker: str) -> list[psutil.Process]:
    """SIGSTOP every process the worker has started (the job's DataLoader workers), as a read on a
    dead network mount or a deadlock would stop them; return them."""
    children = psutil.Process(faults.stack.processes[worker].pid).children(recursive=True)
    assert children, "the job has no DataLoader worker processes"
    for child in children:
        child.send_signal(signal.SIGSTOP)
    return children


def test_a_cancel_ends_a_job_whose_loader_workers_are_stopped(faults: FaultStack):
    worker = faults.start_worker(STOP_TIMEOUT_S=str(STOP_TIMEOUT_S))
    try:
        job_id = faults.submit(resumable_spec(epochs=50))
        faults.wait_until(job_id, lambda r: r["progress"]["step"] >= 5)
        stopped = _stop_loader_workers(faults, worker)
        time.sleep(1)
        asked = time.monotonic()
        faults.api.post(f"/jobs/{job_id}/cancel").raise_for_status()
        record = wait_for_job(faults.api, job_id, timeout_s=60)
        ended_after_s = time.monotonic() - asked
        assert record["state"] == "cancelled", record
        # The bound: STOP_TIMEOUT_S to notice, then the processes are killed and the loop raises
        # within torch's 5 s worker check.
        assert ended_after_s < STOP_TIMEOUT_S + 15, ended_after_s
        reason = record["transitions"][-1]["reason"]
        assert reason.startswith("cancelled by request; the job hung in training (no progress for "), reason
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stopped)
        # The worker is free again: the next job runs.
        assert wait_for_job(faults.api, faults.submit(resumable_spec(epochs=1)), timeout_s=120)["state"] == "succeeded"
    finally:
        faults.stack.stop_process(worker)


def test_a_time_limit_ends_a_job_whose_loader_workers_are_stopped(faults: FaultStack):
    worker = faults.start_worker(STOP_TIMEOUT_S=str(STOP_TIMEOUT_S))
    try:
        spec = resumable_spec(epochs=50, max_runtime_s=20)
        job_id = faults.submit(spec)
        faults.wait_until(job_id, lambda r: r["progress"]["step"] >= 5)
        _stop_loader_workers(faults, worker)
        started = faults.get(job_id)["started_at"]
        record = wait_for_job(faults.api, job_id, timeout_s=90)
        assert record["state"] == "failed" and record["transitions"][-1]["reason"] == "time limit", record
        assert record["error"].startswith("time limit: max_runtime_s is 20; the job hung in training"), record["error"]
        assert record["finished_at"] - started < 20 + STOP_TIMEOUT_S + 15
    finally:
        faults.stack.stop_process(worker)


def test_a_loader_worker_killed_by_sigbus_fails_the_job_as_a_job_error_with_advice(faults: FaultStack):
    # pytorch/pytorch#5040: out of shared memory, a DataLoader worker dies of SIGBUS.
    worker = faults.start_worker()
    try:
        job_id = faults.submit(resumable_spec(epochs=50))
        faults.wait_until(job_id, lambda r: r["progress"]["step"] >= 5)
        children = psutil.Process(faults.stack.processes[worker].pid).children(recursive=True)
        children[0].send_signal(signal.SIGBUS)
        record = wait_for_job(faults.api, job_id, timeout_s=60)
    finally:
        faults.stack.stop_process(worker)
    assert record["state"] == "failed" and record["transitions"][-1]["reason"] == "job error", record
    assert "a DataLoader worker ran out of shared memory (SIGBUS" in record["error"] and "--shm-size" in record["error"]
    assert "internal error" not in record["error"]


def test_a_cancel_ends_a_job_whose_download_hangs(faults: FaultStack, tmp_path: Path):
    from trainq.sample_data import write_digits

    write_digits(tmp_path, limit=50)
    uri = "s3://trainq/datasets/hung-download/"
    faults.storage.upload_dir(tmp_path, uri)  # straight to S3, not through the proxy
    faults.proxy.slow_marker, faults.proxy.slow_delay_s = b"/datasets/hung-download/", 600.0  # a GET that never answers
    worker = faults.start_worker(STOP_TIMEOUT_S=str(STOP_TIMEOUT_S))
    try:
        spec = resumable_spec()
        spec["dataset"] = spec["dataset"] | {"uri": uri}
        job_id = faults.submit(spec)
        faults.wait_until(job_id, lambda r: r["progress"]["phase"] == "downloading")
        time.sleep(2)
        asked = time.monotonic()
        faults.api.post(f"/jobs/{job_id}/cancel").raise_for_status()
        record = wait_for_job(faults.api, job_id, timeout_s=60)
        ended_after_s = time.monotonic() - asked
    finally:
        faults.proxy.slow_marker, faults.proxy.slow_delay_s = None, 0.05
        faults.stack.stop_process(worker)
    # The main thread, interrupted, then waits in boto3's cleanup for the GET that never answers:
    # the watchdog's last resort records the outcome and exits the worker (a supervisor restarts
    # it), STOP_TIMEOUT_S + 2 × 10 s (its escalation steps) after the cancel.
    assert record["state"] == "cancelled" and ended_after_s < STOP_TIMEOUT_S + 2 * 10 + 10, ended_after_s
    assert record["transitions"][-1]["reason"].startswith("cancelled by request; the job hung in downloading (no progress for ")
