"""Routes about the service, over real HTTP on the session stack: the job list's filters and
cursor, workers, queues, health, metrics, offline docs and the TensorBoard settings."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, api_process
from tests.fixtures import example_spec
from trainq.stack import LocalStack, free_port


#: A queue no worker consumes (the only one besides `default` that main's QUEUES allows in tests).
PARKED = "test-nobody-listens"


def _parked(api: httpx.Client, queue: str = PARKED, **overrides) -> dict:
    response = api.post("/jobs", json=example_spec() | {"queue": queue} | overrides)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture
def owner_client(stack: LocalStack):
    """A client of a fresh owner (so its list holds only what the test submits)."""
    with httpx.Client(base_url=stack.api_url, timeout=30,
                      headers={"Authorization": f"Bearer {stack.create_token(f'lister-{uuid.uuid4().hex[:8]}')}"}) as client:
        yield client


# -- GET /jobs --------------------------------------------------------------------------------
def test_the_list_filters_by_state_queue_and_name_with_a_cursor(owner_client: httpx.Client, stack: LocalStack):
    queue = PARKED  # the owner is new: its jobs on this queue are the test's
    first = _parked(owner_client, queue, name="alpha")
    second = _parked(owner_client, queue, name="beta")
    third = _parked(owner_client, queue, name="alpha")
    assert owner_client.post(f"/jobs/{second['id']}/cancel").status_code == 202
    ids = lambda page: [job["id"] for job in page["data"]]  # noqa: E731
    assert ids(owner_client.get("/jobs", params={"state": "cancelled"}).json()) == [second["id"]]
    assert owner_client.get("/jobs", params={"queue": "default"}).json()["data"] == []
    assert ids(owner_client.get("/jobs", params={"state": "queued", "queue": queue}).json()) == [third["id"], first["id"]]
    assert ids(owner_client.get("/jobs", params={"name": "alpha", "state": "queued"}).json()) == [third["id"], first["id"]]
    page = owner_client.get("/jobs", params={"queue": queue, "limit": 2}).json()
    assert ids(page) == [third["id"], second["id"]] and page["count"] == 3
    rest = owner_client.get("/jobs", params={"queue": queue, "limit": 2, "cursor": page["next_cursor"]}).json()
    assert ids(rest) == [first["id"]] and rest["next_cursor"] is None
    assert "spec" not in page["data"][0]
    # Another owner's jobs are not there for a filter either; an admin sees them, also by owner.
    other = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.create_token('someone-else')}"})
    assert other.get("/jobs", params={"queue": queue}).json()["data"] == []
    assert other.get("/jobs", params={"owner": first["owner"]}).json()["data"] == []
    admin = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ids(admin.get("/jobs", params={"owner": first["owner"], "queue": queue}).json()) == [third["id"], second["id"], first["id"]]
    assert first["id"] not in ids(admin.get("/jobs", params={"owner": "someone-else"}).json())


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"stat": "running"}, ["query", "stat"]),  # a typo is refused, not ignored
        ({"offset": 20}, ["query", "offset"]),
        ({"state": "sleeping"}, ["query", "state"]),
        ({"queue": "no spaces"}, ["query", "queue"]),
        ({"limit": 501}, ["query", "limit"]),
        ({"cursor": "???"}, ["query", "cursor"]),
    ],
)
def test_bad_or_unknown_list_parameters_are_422_naming_them(api: httpx.Client, params: dict, loc: list):
    response = api.get("/jobs", params=params)
    assert response.status_code == 422, response.text
    assert loc in [error["loc"] for error in response.json()["detail"]]


@pytest.mark.parametrize("path", ["/workers", "/queues", "/jobs/{id}/artifacts", "/jobs/{id}/logs", "/config/tensorboard"])
def test_other_routes_refuse_unknown_parameters(api: httpx.Client, path: str):
    job = _parked(api)
    response = api.get(path.format(id=job["id"]), params={"verbose": "1"})
    assert response.status_code == 422 and ["query", "verbose"] in [e["loc"] for e in response.json()["detail"]]


# -- workers and queues -----------------------------------------------------------------------
def test_workers_report_themselves(api: httpx.Client):
    workers = api.get("/workers").json()["data"]
    worker = next(w for w in workers if w["name"].startswith("worker1@"))
    assert worker["queues"] == ["default", "dry-run"] and worker["pid"] > 0 and worker["host"]
    assert isinstance(worker["device"]["cuda_available"], bool) and worker["device"]["torch_version"]
    assert (len(worker["device"]["gpus"]) > 0) == worker["device"]["cuda_available"]
    assert time.time() - worker["last_heartbeat"] < 10  # reported every second on this stack


def test_queues_count_waiting_jobs_and_their_workers(api: httpx.Client):
    depth = lambda: {q["name"]: q for q in api.get("/queues").json()["data"]}.get(PARKED, {"depth": 0})["depth"]  # noqa: E731
    before = depth()
    for _ in range(2):
        _parked(api)
    queues = {q["name"]: q for q in api.get("/queues").json()["data"]}
    assert queues[PARKED] == {"name": PARKED, "depth": before + 2, "workers": 0}
    assert queues["default"]["workers"] >= 1


# -- health -----------------------------------------------------------------------------------
def test_readyz_checks_redis_and_s3_and_counts_workers(stack: LocalStack):
    ready = httpx.get(f"{stack.api_url}/readyz")  # no token: probes have none
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "redis": "ok", "s3": "ok", "workers": ready.json()["workers"]}
    assert ready.json()["workers"] >= 1


def test_readyz_is_503_while_s3_is_unreachable(stack: LocalStack, tmp_path: Path):
    with api_process(stack, tmp_path, S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}") as no_s3:
        ready = httpx.get(f"{no_s3.api_url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["s3"] == "unavailable" and ready.json()["redis"] == "ok"
        assert httpx.get(f"{no_s3.api_url}/healthz").status_code == 200


# -- metrics ----------------------------------------------------------------------------------
def test_metrics_count_jobs_queues_workers_and_submits(api: httpx.Client, stack: LocalStack):
    _parked(api)
    text = api.get("/metrics").text
    depth = next(line for line in text.splitlines() if line.startswith(f'trainq_queue_depth{{queue="{PARKED}"}}'))
    assert float(depth.split()[1]) >= 1
    assert 'trainq_jobs{state="queued"}' in text and "trainq_job_store_up 1.0" in text
    assert "trainq_workers " in text and 'trainq_worker_busy{worker="worker1@' in text
    assert 'trainq_worker_upload_bytes_total{worker="worker1@' in text
    count = next(line for line in text.splitlines() if line.startswith("trainq_submit_duration_seconds_count"))
    assert float(count.split()[1]) >= 1
    assert 'trainq_http_requests_total{handler="/jobs",method="POST",status="2xx"}' in text
    assert httpx.get(f"{stack.api_url}/metrics").status_code == 401  # a token, as everywhere


# -- docs and settings ------------------------------------------------------------------------
@pytest.mark.parametrize(("page", "asset"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_docs_pages_load_their_assets_from_the_api(stack: LocalStack, page: str, asset: str):
    html = httpx.get(f"{stack.api_url}{page}").text
    assert f"/static-offline-docs/{asset}" in html and "cdn.jsdelivr" not in html and "unpkg" not in html
    script = httpx.get(f"{stack.api_url}/static-offline-docs/{asset}")
    assert script.status_code == 200 and len(script.content) > 100_000


def test_tensorboard_config_names_the_prefix_and_endpoint_but_no_secret(api: httpx.Client, stack: LocalStack):
    config = api.get("/config/tensorboard").json()
    assert config == {"logdir": "s3://trainq/jobs/", "s3_endpoint": stack.env["S3_ENDPOINT_URL"], "region": "us-east-1"}
    assert stack.env["AWS_SECRET_ACCESS_KEY"] not in api.get("/config/tensorboard").text
