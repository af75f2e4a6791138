"""Session fixtures: one real local stack (redis-server, moto S3 server, uvicorn API, a Celery
worker process) shared by the tests that need it. Nothing is mocked.

The stack runs with authentication on (``AUTH_REQUIRED=true``): the ``api`` client sends a
token of the owner ``tester``; ``ADMIN_TOKEN`` is set to :data:`ADMIN_TOKEN`. Quotas are high
here (many tests submit to the owner ``tester``); ``tests/api/test_limits.py`` checks them on an
API of its own.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from shared.records import FINAL_STATES as FINAL
from shared.storage import Storage
from tests.fixtures import DIGITS_URI
from trainq.stack import LocalStack

FINAL_STATES = {state.value for state in FINAL}
ADMIN_TOKEN = "tq_admin_" + secrets.token_hex(24)
#: The session stack's environment: auth on, quotas out of the way, a queue no worker consumes
#: (jobs stay queued), the tests' own prefix and a bucket that does not exist.
STACK_ENV = {
    "AUTH_REQUIRED": "true",
    "ADMIN_TOKEN": ADMIN_TOKEN,
    "MAX_ACTIVE_JOBS_PER_OWNER": "100000",
    "SUBMISSIONS_PER_MINUTE": "100000",
    "QUEUES": "default,test-nobody-listens,ddp",
    "DATA_URIS_ALLOWED": "s3://trainq/datasets/,s3://trainq/tables/,s3://trainq/weights/,s3://trainq/tests/,s3://no-such-bucket-xyz/",
    # The `api` fixture's owner also reads its team's prefix; no other owner does.
    "DATA_URIS_ALLOWED_BY_OWNER": '{"tester": ["s3://trainq/teams/tester/"]}',
    # Quick worker status reports and log uploads, so tests see them within seconds.
    "WORKER_HEARTBEAT_INTERVAL_S": "1",
    "LOG_UPLOAD_INTERVAL_S": "1",
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The running stack. Its addresses live in ``stack.env`` / ``stack.settings`` only: they are
    not put into this process's environment, where every later LocalStack (the fault-injection
    stack, the fuzzing stack) would take them for servers to share instead of starting its own."""
    with LocalStack(tmp_path_factory.mktemp("stack"), isolated=True, env=STACK_ENV) as running:
        running.seed_digits(DIGITS_URI)
        yield running


@pytest.fixture(scope="session")
def storage(stack: LocalStack) -> Storage:
    """boto3 on the stack's S3 server."""
    return Storage(stack.settings)


@pytest.fixture(scope="session")
def api_token(stack: LocalStack) -> str:
    """A bearer token of the owner ``tester`` (not an admin)."""
    return stack.create_token("tester")


@pytest.fixture
def api(stack: LocalStack, api_token: str) -> Iterator[httpx.Client]:
    """An HTTP client on the stack's API, authenticated as ``tester``."""
    with httpx.Client(base_url=stack.api_url, timeout=30, headers={"Authorization": f"Bearer {api_token}"}) as client:
        yield client


def wait_for_job(api: httpx.Client, job_id: str, timeout_s: float = 300) -> dict:
    """Poll ``GET /jobs/{id}`` until the job is final; return the record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = api.get(f"/jobs/{job_id}").raise_for_status().json()
        if record["state"] in FINAL_STATES:
            return record
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not final after {timeout_s} s: {record}")


def upload_tree(storage: Storage, root: Path, uri: str) -> str:
    """Upload a local folder to ``uri`` and return ``uri``."""
    storage.upload_dir(root, uri)
    return uri


@contextmanager
def api_process(stack: LocalStack, workdir: Path, *, healthy: bool = True, **env: str) -> Iterator[LocalStack]:
    """A second API process on the session stack's Redis and S3 with ``env`` changed (limits,
    auth off…); its log is ``<workdir>/logs/api.log``. No worker: nothing it queues runs."""
    extra = LocalStack(workdir, workers=0, env=stack.env | env)
    try:
        extra.start_api(healthy=healthy)
        yield extra
    finally:
        extra.stop()
