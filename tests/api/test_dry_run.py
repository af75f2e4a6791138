"""`POST /jobs?dry_run=true` on the real stack: it runs on a worker (never in the API process),
through the job's own preparation, and answers what would fail the job as a 422 with a `loc`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio
import torch

from shared.dryruns import ACTIVE_KEY, OWNER_ACTIVE_KEY, request_dry_run
from shared.queue import make_celery
from shared.storage import Storage
from tests.conftest import api_process
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
    client = redis.asyncio.Redis.from_url(stack.env["REDIS_URL"])
    started = time.monotonic()
    wait = request_dry_run(
        make_celery(stack.settings), client, example_spec(), "dry-run-nobody-listens", 1.5, owner="tester", per_owner=1, overall=1000
    )
    assert asyncio.run(wait) is None
    assert time.monotonic() - started < 10  # and the request is withdrawn: a worker that starts later skips it


#: Concurrent dry runs of one owner while no worker takes any (issue 17: they held all 40 threads).
FLOOD = 40
#: A dry run the worker answers at once: a folder under an allowed prefix with nothing in it.
EMPTY_DATASET_SPEC = example_spec() | {"dataset": example_spec()["dataset"] | {"uri": "s3://trainq/datasets/nothing-here/"}}


def _dry_run(url: str, token: str, spec: dict, timeout_s: float = 300) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"}) as client:
        return client.post("/jobs", params={"dry_run": "true"}, json=spec)


def _wait_for(check, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def _forget_dry_runs(client: redis.Redis, *owners: str) -> None:
    """Free the places of ``owners``' dry runs (their API process is gone), so later tests have them."""
    for owner in owners:
        members = client.zrange(OWNER_ACTIVE_KEY.format(owner), 0, -1)
        if members:
            client.zrem(ACTIVE_KEY, *members)
        client.delete(OWNER_ACTIVE_KEY.format(owner))


def test_a_dry_run_flood_holds_no_thread_and_is_bounded_per_owner_and_overall(stack, tmp_path: Path):
    env = {"DRY_RUN_QUEUE": "dry-run-flood", "DRY_RUN_TIMEOUT_S": "60", "DRY_RUNS_PER_OWNER": str(FLOOD),
           "DRY_RUNS_MAX": str(FLOOD + 1)}
    flooder, other, third = (stack.create_token(owner) for owner in ("flood-a", "flood-b", "flood-c"))
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        with api_process(stack, tmp_path, **env) as extra, ThreadPoolExecutor(FLOOD + 1) as pool:
            headers = {"Authorization": f"Bearer {flooder}"}
            api = httpx.Client(base_url=extra.api_url, timeout=10, headers=headers)
            job = api.post("/jobs", json=example_spec() | {"queue": "test-nobody-listens"}).raise_for_status().json()
            flood_deadline = time.monotonic() + 60
            flood = [pool.submit(_dry_run, extra.api_url, flooder, example_spec()) for _ in range(FLOOD)]
            _wait_for(lambda: client.zcard(OWNER_ACTIVE_KEY.format("flood-a")) == FLOOD, "the flood is waiting")

            # Every other route still answers (they waited for the flood's deadline: 12.7 s of 15).
            assert httpx.get(f"{extra.api_url}/healthz", timeout=10).status_code == 200
            assert api.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
            # One owner past its bound: 429 at once, with when to retry.
            over = _dry_run(extra.api_url, flooder, example_spec(), timeout_s=10)
            assert over.status_code == 429 and "DRY_RUNS_PER_OWNER" in over.json()["detail"]
            assert 1 <= int(over.headers["Retry-After"]) <= 60
            # Another owner is admitted (the one place left), a third is refused by the overall bound.
            waiting = pool.submit(_dry_run, extra.api_url, other, example_spec())
            _wait_for(lambda: client.zcard(OWNER_ACTIVE_KEY.format("flood-b")) == 1, "flood-b's dry run is waiting")
            full = _dry_run(extra.api_url, third, example_spec(), timeout_s=10)
            assert full.status_code == 429 and "DRY_RUNS_MAX" in full.json()["detail"] and "Retry-After" in full.headers
            assert not any(future.done() for future in [*flood, waiting]) and time.monotonic() < flood_deadline
            api.close()
    finally:
        _forget_dry_runs(client, "flood-a", "flood-b", "flood-c")


def test_one_owners_backlog_does_not_delay_another_owners_dry_run(stack, tmp_path: Path):
    env = {"DRY_RUN_QUEUE": "dry-run-fair", "DRY_RUN_TIMEOUT_S": "300", "DRY_RUNS_PER_OWNER": "30", "DRY_RUNS_MAX": "1000"}
    heavy, light = stack.create_token("team-a"), stack.create_token("team-b")
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    answered: list[str] = []
    lock = threading.Lock()

    def dry_run(owner: str, token: str) -> httpx.Response:
        response = _dry_run(extra.api_url, token, EMPTY_DATASET_SPEC)
        with lock:
            answered.append(owner)
        return response

    taken: list[str] = []  # the owners whose requests the worker took, in order (the Lua's LPOPs)

    def watch(ready: threading.Event, done: threading.Event) -> None:
        with client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                words = command["command"].split()
                if words[0].upper() == "LPOP" and ":dry-run-fair:pending:" in command["command"]:
                    taken.append(words[1].strip('"').rsplit(":", 1)[1])
                if done.is_set() or len(taken) >= 26:
                    return

    ready, done = threading.Event(), threading.Event()
    watcher = threading.Thread(target=watch, args=(ready, done), daemon=True)
    try:
        with api_process(stack, tmp_path, **env) as extra, ThreadPoolExecutor(26) as pool:
            backlog = [pool.submit(dry_run, "team-a", heavy) for _ in range(25)]
            _wait_for(lambda: client.zcard(OWNER_ACTIVE_KEY.format("team-a")) == 25, "team-a's 25 dry runs are queued")
            single = pool.submit(dry_run, "team-b", light)
            _wait_for(lambda: client.zcard(OWNER_ACTIVE_KEY.format("team-b")) == 1, "team-b's dry run is queued")
            watcher.start()
            ready.wait(5)
            extra.start_worker("fair-worker", queues=["dry-run-fair"])  # 26 requests wait: a FIFO serves team-b last
            assert single.result().status_code == 422, single.result().text
            assert all(future.result().status_code == 422 for future in backlog)
    finally:
        done.set()
        client.ping()  # one more command, so the watcher sees done
        watcher.join(10)
        _forget_dry_runs(client, "team-a", "team-b")
    # Owners are served in turn: team-a's first, team-b's second — the worker's order, not the
    # clients' (which see the answers a poll apart: when the worker is fast, in any order).
    assert len(answered) == 26 and "team-b" in taken and taken.index("team-b") < 3, taken
