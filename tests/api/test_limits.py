"""Limits on what one request or one owner can cost, over real HTTP: body size counted on the bytes
read, a short list view, capped error lists, 422 (not 500) for hostile strings, quotas (429), and
no internal addresses in answers."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import api_process
from tests.fixtures import example_spec
from trainq.stack import LocalStack, free_port

PARKED = "test-nobody-listens"


def test_a_chunked_body_over_the_limit_is_413(api: httpx.Client):
    # Valid JSON (a spec, then 2 MiB of whitespace) with no Content-Length: only the bytes tell.
    spec = (json.dumps(example_spec() | {"queue": PARKED})).encode()
    chunks = [spec] + [b" " * 65536] * 32

    response = api.post("/jobs", content=iter(chunks), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    small = api.post("/jobs", content=iter([spec, b" " * 1000]), headers={"content-type": "application/json"})
    assert small.status_code == 202, small.text


def test_the_list_view_has_no_specs(api: httpx.Client):
    job = api.post("/jobs", json=example_spec() | {"queue": PARKED, "name": "listed"}).json()
    page = api.get("/jobs", params={"limit": 5}).json()
    listed = next(item for item in page["data"] if item["id"] == job["id"])
    assert listed["name"] == "listed" and listed["state"] == "queued" and listed["owner"] == "tester"
    assert not {"spec", "dataset", "artifacts", "transitions"} & set(listed)
    assert api.get(f"/jobs/{job['id']}").json()["spec"]["name"] == "listed"


def test_sixty_thousand_unknown_keys_give_a_short_422(api: httpx.Client):
    body = "{" + ", ".join(f'"k{i}": 0' for i in range(60_000)) + ', "dataset": {"uri": "s3://trainq/datasets/digits/"}}'
    response = api.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert len(response.content) < 20_000, len(response.content)
    errors = response.json()["detail"]
    assert len(errors) == 51 and errors[0]["loc"] == ["body", "k0"]
    assert errors[-1]["type"] == "too_many_errors" and "59950 more errors" in errors[-1]["msg"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (rb'{"name": "\ud800", "dataset": {"uri": "s3://trainq/datasets/digits/"}}', ["body", "name"]),
        (rb'{"\udfff": 1, "dataset": {"uri": "s3://trainq/datasets/digits/"}}', ["body"]),  # pydantic: at the root
        (rb'{"dataset": {"uri": "s3://trainq/datasets/digits/\ud800/"}}', ["body", "dataset", "uri"]),
        (rb'{"dataset": {"type": "csv", "uri": "s3://trainq/t.csv", "target": "y", "task": "regression",'
         rb' "features": ["a", "\udbff"]}}', ["body", "dataset", "features", 1]),
    ],
)
def test_a_lone_surrogate_anywhere_is_422_not_500(api: httpx.Client, body: bytes, loc: list):
    response = api.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert loc in [error["loc"] for error in response.json()["detail"]]


@pytest.mark.parametrize("char", ["\x1b", "\r", "\n", "\x00", "\x07", "\x7f", "\x85", "\x9b"])
@pytest.mark.parametrize(
    ("where", "loc"),
    [
        (lambda s, c: s["dataset"].update(uri=f"s3://trainq/datasets/dig{c}its/"), ["body", "dataset", "uri"]),
        (lambda s, c: s["dataset"].update(extra_uris=[f"local://x{c}[2J/"]), ["body", "dataset", "extra_uris"]),
        (lambda s, c: s.update(name=f"run{c}[31m"), ["body", "name"]),
        (lambda s, c: s["model"].update(weights_uri=f"s3://trainq/w{c}.pt"), ["body", "model", "weights_uri"]),
    ],
)
def test_control_characters_in_uris_and_names_are_422(api: httpx.Client, char: str, where, loc: list):
    spec = example_spec() | {"queue": PARKED}
    where(spec, char)
    response = api.post("/jobs", json=spec)
    assert response.status_code == 422, response.text
    messages = [error["msg"] for error in response.json()["detail"] if error["loc"] == loc]
    # The same words for every character: LF in a URI used to give a regex mismatch instead.
    assert messages and f"contains the control character {char!r}" in messages[0], response.text


def test_csv_columns_with_control_characters_are_422(api: httpx.Client):
    spec = {"dataset": {"type": "csv", "uri": "s3://trainq/t.csv", "target": "y\x1b[2J", "task": "regression",
                        "features": ["a", "b\r\nINFO forged"]}}
    errors = {tuple(error["loc"]): error["msg"] for error in api.post("/jobs", json=spec).json()["detail"]}
    assert ("body", "dataset", "target") in errors and "'\\x1b'" in errors[("body", "dataset", "target")]
    assert "item 1 contains the control character '\\r'" in errors[("body", "dataset", "features")]


# -- quotas, on an API of their own with small limits ------------------------------------------
@pytest.fixture(scope="module")
def limited(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """An API on the session stack's Redis allowing 2 active jobs and 5 submissions a minute per owner."""
    with api_process(stack, tmp_path_factory.mktemp("limited"), MAX_ACTIVE_JOBS_PER_OWNER="2",
                     SUBMISSIONS_PER_MINUTE="5") as api:
        yield api


def owner_client(stack: LocalStack, api: LocalStack) -> httpx.Client:
    token = stack.create_token(f"quota-{uuid.uuid4().hex[:8]}")
    return httpx.Client(base_url=api.api_url, timeout=30, headers={"Authorization": f"Bearer {token}"})


def test_an_owner_over_the_active_job_quota_gets_429(stack: LocalStack, limited: LocalStack):
    spec = example_spec() | {"queue": PARKED}
    with owner_client(stack, limited) as api, owner_client(stack, limited) as other:
        first, _ = [api.post("/jobs", json=spec).raise_for_status().json() for _ in range(2)]
        refused = api.post("/jobs", json=spec)
        assert refused.status_code == 429 and "MAX_ACTIVE_JOBS_PER_OWNER" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) > 0
        assert api.get("/jobs").json()["count"] == 2
        assert other.post("/jobs", json=spec).status_code == 202  # quotas are per owner
        api.post(f"/jobs/{first['id']}/cancel").raise_for_status()  # a final job frees its place
        assert api.post("/jobs", json=spec).status_code == 202


def test_an_owner_over_the_pending_job_quota_gets_429_naming_it(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory):
    spec = example_spec() | {"queue": PARKED}
    with api_process(stack, tmp_path_factory.mktemp("pending"), MAX_PENDING_JOBS_PER_OWNER="2") as limited_pending, \
            owner_client(stack, limited_pending) as api:
        first, _ = [api.post("/jobs", json=spec).raise_for_status().json() for _ in range(2)]
        refused = api.post("/jobs", json=spec)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "has 2 jobs waiting to start" in refused.json()["detail"]
        assert "MAX_PENDING_JOBS_PER_OWNER" in refused.json()["detail"]
        api.post(f"/jobs/{first['id']}/cancel").raise_for_status()  # a cancelled job no longer waits
        assert api.post("/jobs", json=spec).status_code == 202


def test_an_owner_over_the_submission_rate_gets_429_with_retry_after(stack: LocalStack, limited: LocalStack):
    spec = example_spec() | {"queue": PARKED}
    with owner_client(stack, limited) as api:
        for _ in range(5):
            job = api.post("/jobs", json=spec).raise_for_status().json()
            api.post(f"/jobs/{job['id']}/cancel").raise_for_status()
        refused = api.post("/jobs", json=spec)
        assert refused.status_code == 429 and "SUBMISSIONS_PER_MINUTE" in refused.json()["detail"]
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert api.post("/jobs", params={"dry_run": "true"}, json=spec).status_code == 429


def test_epochs_are_capped(api: httpx.Client):
    assert api.post("/jobs", json=example_spec() | {"epochs": 100_001}).status_code == 422


# -- internal addresses ------------------------------------------------------------------------
def test_503_does_not_name_the_redis_address(stack: LocalStack, tmp_path: Path):
    port = free_port()
    with api_process(stack, tmp_path, healthy=False, REDIS_URL=f"redis://127.0.0.1:{port}/0") as down:
        ready = httpx.get(f"{down.api_url}/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] == "unavailable" and ready.json()["s3"] == "ok"
        # A token of the issued shape (a malformed one is refused without asking Redis).
        response = httpx.get(f"{down.api_url}/jobs", headers={"Authorization": "Bearer tq_" + "x" * 43})
        assert response.status_code == 503
        assert response.json()["detail"] == "job store unavailable; try again shortly"
        for answer in (ready, response):
            assert str(port) not in answer.text and "127.0.0.1" not in answer.text
        assert httpx.get(f"{down.api_url}/healthz").status_code == 200  # the process is up
    assert str(port) in (tmp_path / "logs" / "api.log").read_text()  # the details are in the server log


@pytest.mark.parametrize("depth", [600, 950, 5000])
@pytest.mark.parametrize("brackets", ["[]", '{"a":}'])
def test_deeply_nested_json_is_a_4xx_never_a_500(api: httpx.Client, depth: int, brackets: str):
    opening, closing = (brackets[0], brackets[1]) if brackets == "[]" else ('{"a":', "}")
    body = '{"dataset": {"uri": "s3://trainq/datasets/digits/"}, "name": ' + opening * depth + "1" * (brackets != "[]")
    body += closing * depth + "}"
    response = api.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text[:300]
    assert len(response.content) < 20_000


@pytest.mark.parametrize("cursor_text", [b"nan x", b"inf x", b"-Infinity x", b"1_0 x", b"\xd9\xa3 x", b"1e999 x"])
def test_a_cursor_with_an_odd_number_is_a_422(api: httpx.Client, cursor_text: bytes):
    cursor = base64.urlsafe_b64encode(cursor_text).decode().rstrip("=")
    response = api.get("/jobs", params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "cursor"]


# Header bytes are Latin-1 to the server: b"\xb2" is "²", which str.isdigit() takes for a digit.
@pytest.mark.parametrize("last_event_id", [b"\xb2:0", b"1:\xb9", "١:0".encode(), b"0:0", b"1:-1", b"1:1_0", b":", b"1:2:3"])
def test_an_odd_last_event_id_starts_the_log_from_the_beginning(api: httpx.Client, last_event_id: bytes):
    job = api.post("/jobs", json=example_spec() | {"queue": PARKED}).json()
    api.post(f"/jobs/{job['id']}/cancel").raise_for_status()  # final and never ran: the stream ends at once
    response = api.get(f"/jobs/{job['id']}/logs", params={"follow": "true"}, headers={"Last-Event-ID": last_event_id})
    assert response.status_code == 200, response.text
    assert "event: end" in response.text
