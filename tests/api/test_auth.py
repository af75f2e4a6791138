"""Bearer tokens, owners and admins over real HTTP, on the session stack (AUTH_REQUIRED=true)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.auth import TOKEN_KEY, TOKENS_KEY, TokenStore
from tests.conftest import ADMIN_TOKEN, api_process
from tests.fixtures import REPO, example_spec
from trainq.stack import LocalStack

PARKED = "test-nobody-listens"  # a queue no worker consumes: jobs stay queued


def client(stack: LocalStack, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=stack.api_url, timeout=30, headers=headers)


@pytest.fixture
def owners(stack: LocalStack) -> Iterator[dict[str, httpx.Client]]:
    """Clients of two fresh owners and of an admin."""
    suffix = uuid.uuid4().hex[:8]
    clients = {
        "alice": client(stack, stack.create_token(f"alice-{suffix}")),
        "bob": client(stack, stack.create_token(f"bob-{suffix}")),
        "admin": client(stack, stack.create_token(f"root-{suffix}", admin=True)),
    }
    yield clients
    for each in clients.values():
        each.close()


def submit(api: httpx.Client, **overrides) -> dict:
    response = api.post("/jobs", json=example_spec() | {"queue": PARKED} | overrides)
    assert response.status_code == 202, response.text
    return response.json()


ROUTES = [("GET", "/jobs"), ("GET", "/jobs/some-id"), ("POST", "/jobs/some-id/cancel"), ("POST", "/jobs"),
          ("POST", "/jobs?dry_run=true"), ("GET", "/jobs/some-id/logs"), ("GET", "/jobs/some-id/logs?follow=true"),
          ("GET", "/jobs/some-id/artifacts"), ("GET", "/workers"), ("GET", "/queues"), ("GET", "/storage"), ("GET", "/metrics"),
          ("GET", "/config/tensorboard"), ("GET", "/tokens"), ("POST", "/tokens"), ("DELETE", "/tokens?owner=x")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer tq_not-a-real-token", "Bearer", "Basic dXNlcjpwYXNz"])
def test_every_route_but_health_is_401_without_a_valid_token(stack: LocalStack, method: str, path: str, authorization):
    with client(stack, None) as anonymous:
        headers = {"Authorization": authorization} if authorization is not None else {}
        response = anonymous.request(method, path, json=example_spec(), headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200


def test_a_job_records_its_owner_and_other_owners_get_404(owners: dict[str, httpx.Client]):
    alice, bob, admin = owners["alice"], owners["bob"], owners["admin"]
    job = submit(alice, name="alices-job")
    assert job["owner"].startswith("alice-")
    assert alice.get(f"/jobs/{job['id']}").json()["owner"] == job["owner"]
    # To bob the job does not exist: the same 404 as an unknown id, so ids do not leak.
    assert bob.get(f"/jobs/{job['id']}").status_code == 404
    assert bob.get("/jobs/no-such-job").json()["detail"] == "job 'no-such-job' not found"
    assert bob.get(f"/jobs/{job['id']}").json()["detail"] == f"job '{job['id']}' not found"
    assert bob.post(f"/jobs/{job['id']}/cancel").status_code == 404
    assert alice.get(f"/jobs/{job['id']}").json()["state"] == "queued"  # bob's cancel did nothing
    assert job["id"] not in [j["id"] for j in bob.get("/jobs", params={"limit": 500}).json()["data"]]
    assert bob.get("/jobs").json()["count"] == 0
    mine = alice.get("/jobs").json()
    assert mine["count"] == 1 and [j["id"] for j in mine["data"]] == [job["id"]]
    # An admin sees and cancels every owner's jobs.
    assert admin.get(f"/jobs/{job['id']}").status_code == 200
    assert job["id"] in [j["id"] for j in admin.get("/jobs", params={"limit": 500}).json()["data"]]
    assert admin.post(f"/jobs/{job['id']}/cancel").json()["state"] == "cancelled"


def test_idempotency_keys_are_per_owner(owners: dict[str, httpx.Client]):
    alice, bob = owners["alice"], owners["bob"]
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    spec = example_spec() | {"queue": PARKED}
    first = alice.post("/jobs", json=spec, headers=key).json()
    # Bob's same key with the same spec is a new job of his, not alice's job.
    same = bob.post("/jobs", json=spec, headers=key)
    assert same.status_code == 202 and same.json()["id"] != first["id"], same.text
    assert "idempotent-replayed" not in same.headers and same.json()["owner"] == bob.get("/jobs").json()["data"][0]["owner"]
    # With another spec it conflicts with bob's own job only: alice's job id is never revealed.
    other = bob.post("/jobs", json=spec | {"seed": 7}, headers=key)
    assert other.status_code == 409 and same.json()["id"] in other.text and first["id"] not in other.text
    replay = alice.post("/jobs", json=spec, headers=key)
    assert replay.json()["id"] == first["id"] and replay.headers["idempotent-replayed"] == "true"


def test_tokens_are_stored_hashed(stack: LocalStack):
    token = stack.create_token(f"hashed-{uuid.uuid4().hex[:8]}")
    client_ = redis.Redis.from_url(stack.env["REDIS_URL"])
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert client_.exists(f"trainq:token:{digest}")
    for key in client_.scan_iter("trainq:token*"):
        assert token.encode() not in key
        values = client_.hvals(key) if client_.type(key) == b"hash" else list(client_.smembers(key))
        assert all(token.encode() not in value for value in values)


def test_admin_token_setting_is_an_admin(stack: LocalStack, owners: dict[str, httpx.Client]):
    job = submit(owners["alice"])
    with client(stack, ADMIN_TOKEN) as admin:
        assert admin.get(f"/jobs/{job['id']}").status_code == 200
    with client(stack, ADMIN_TOKEN[:-1] + ("x" if ADMIN_TOKEN[-1] != "x" else "y")) as wrong:
        assert wrong.get(f"/jobs/{job['id']}").status_code == 401


def _admin(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    env = {**stack.env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trainq.admin", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_admin_command_creates_lists_and_revokes_tokens(stack: LocalStack):
    owner = f"cli-{uuid.uuid4().hex[:8]}"
    created = _admin(stack, "token", "create", "--owner", owner)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("tq_") and len(token) > 40
    with client(stack, token) as api:
        job = submit(api)
        assert job["owner"] == owner
        listed = _admin(stack, "token", "list")
        line = next(line for line in listed.stdout.splitlines() if owner in line)
        assert token not in listed.stdout and line.split()[0] == hashlib.sha256(token.encode()).hexdigest()[:12]
        revoked = _admin(stack, "token", "revoke", line.split()[0])
        assert revoked.returncode == 0 and owner in revoked.stdout
        assert api.get(f"/jobs/{job['id']}").status_code == 401
    assert _admin(stack, "token", "create", "--owner", "bad owner:x").returncode == 1
    assert _admin(stack, "token", "revoke", "--owner", owner).returncode == 1  # nothing left to revoke


def test_openapi_declares_bearer_auth(api: httpx.Client):
    schema = httpx.get(f"{api.base_url}/openapi.json").json()  # docs stay open
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"HTTPBearer": []} in schema["paths"]["/jobs"]["post"]["security"]


def test_without_auth_the_api_serves_only_loopback_clients(stack: LocalStack, tmp_path: Path):
    with api_process(stack, tmp_path, AUTH_REQUIRED="false") as local, httpx.Client(base_url=local.api_url) as api:
        job = submit(api)
        assert job["owner"] == "local"
        assert api.get(f"/jobs/{job['id']}").status_code == 200
        # A request relayed from elsewhere (a reverse proxy on this machine sets X-Forwarded-For,
        # which uvicorn trusts from 127.0.0.1) must not get the anonymous owner's powers.
        relayed = {"X-Forwarded-For": "203.0.113.7"}
        refused = api.get("/jobs", headers=relayed)
        assert refused.status_code == 403 and "AUTH_REQUIRED" in refused.json()["detail"]
        assert api.post("/jobs", json=example_spec(), headers=relayed).status_code == 403
        assert api.get("/healthz", headers=relayed).status_code == 200
        # A valid token still acts as its owner; the anonymous owner sees only its own jobs.
        tester_job = submit(client(stack, stack.create_token("someone")))
        assert api.get(f"/jobs/{tester_job['id']}").status_code == 404
    assert "authentication is OFF" in (tmp_path / "logs" / "api.log").read_text()


def test_admins_manage_tokens_through_the_api(stack: LocalStack, owners: dict[str, httpx.Client]):
    # Creating a token needed direct Redis access (issue 20 item 2).
    owner = f"carol-{uuid.uuid4().hex[:8]}"
    for method, path in (("GET", "/tokens"), ("POST", "/tokens"), ("DELETE", f"/tokens?owner={owner}")):
        refused = owners["alice"].request(method, path, json={"owner": owner})
        assert refused.status_code == 403 and refused.json()["detail"].startswith("only an admin manages tokens")
    with client(stack, ADMIN_TOKEN) as admin:
        issued = admin.post("/tokens", json={"owner": owner})
        assert issued.status_code == 201 and issued.json()["owner"] == owner and issued.json()["admin"] is False
        token, token_id = issued.json()["token"], issued.json()["id"]
        assert hashlib.sha256(token.encode()).hexdigest().startswith(token_id)
        with client(stack, token) as carol:
            assert carol.get("/jobs").status_code == 200
            listed = admin.get("/tokens").json()["data"]
            assert {"id": token_id, "owner": owner, "admin": False} == {k: v for k, v in next(t for t in listed if t["id"] == token_id).items() if k != "created_at"}
            assert all("token" not in entry for entry in listed)
            bad = admin.post("/tokens", json={"owner": "no spaces allowed"})
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "owner"]
            assert admin.delete("/tokens", params={"id": token_id}).json()["data"][0]["id"] == token_id
            assert carol.get("/jobs").status_code == 401
            assert admin.delete("/tokens", params={"id": token_id}).status_code == 404


@pytest.mark.parametrize("owner", ["admin", "local"])
def test_the_reserved_owners_cannot_be_issued_an_ordinary_token(stack: LocalStack, owner: str):
    refused = _admin(stack, "token", "create", "--owner", owner)
    assert refused.returncode == 1 and "reserved" in refused.stderr and not refused.stdout
    with pytest.raises(ValueError, match="reserved"):
        TokenStore(redis.Redis.from_url(stack.env["REDIS_URL"])).create(owner)
    # One issued before the rule (written as the store wrote it then) no longer authenticates.
    old = "tq_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(old.encode()).hexdigest()
    client_ = redis.Redis.from_url(stack.env["REDIS_URL"])
    client_.hset(TOKEN_KEY.format(digest), mapping={"owner": owner, "admin": 0, "created_at": 0})
    client_.sadd(TOKENS_KEY, digest)
    with client(stack, ADMIN_TOKEN) as admin:
        job = submit(admin)  # a job of the owner `admin`
    with client(stack, old) as impostor:
        assert impostor.get(f"/jobs/{job['id']}").status_code == 401
    assert _admin(stack, "token", "create", "--owner", owner, "--admin").returncode == 0  # an admin may act as it


def test_a_flood_of_unknown_tokens_neither_fails_nor_starves_real_clients(stack: LocalStack, tmp_path: Path):
    """150 random tokens and 50 malformed ones at once, beside 10 requests of a real token, on a pool of
    4 Redis connections: the real ones are served, the flood is 401 or 429, nobody gets a 503."""
    real = {"Authorization": f"Bearer {stack.create_token(f'victim-{uuid.uuid4().hex[:8]}')}"}
    random_tokens = [{"Authorization": f"Bearer tq_{secrets.token_urlsafe(32)}"} for _ in range(150)]
    malformed = [{"Authorization": f"Bearer {secrets.token_hex(12)}"} for _ in range(50)]

    async def burst(url: str) -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as api:
            assert (await api.get("/jobs", headers=real)).status_code == 200
            flood = [api.get("/jobs", headers=headers) for headers in random_tokens + malformed]
            served = [api.get("/jobs", headers=real) for _ in range(10)]
            answers = await asyncio.gather(*flood, *served)
            return answers[:-10], answers[-10:]

    with api_process(stack, tmp_path, API_REDIS_CONNECTIONS="4", AUTH_LOOKUPS_PER_MINUTE="50") as extra:
        flood, served = asyncio.run(burst(extra.api_url))
    assert [response.status_code for response in served] == [200] * 10
    codes = [response.status_code for response in flood]
    assert set(codes) <= {401, 429}, sorted(set(codes))
    assert codes.count(401) <= 50  # the rest were refused before any look-up, with when to retry
    assert all(int(response.headers["Retry-After"]) >= 1 for response in flood if response.status_code == 429)
