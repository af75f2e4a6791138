"""Session fixtures: one real local stack (redis-server, moto S3 server, uvicorn API, a Celery
worker process) shared by the tests that need it. Nothing is mocked."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.jobs import FINAL_STATES as FINAL
from shared.storage import Storage
from tests.fixtures import DIGITS_URI
from trainq.stack import LocalStack

FINAL_STATES = {state.value for state in FINAL}
#: The test stack's settings: a queue no worker consumes (jobs stay queued); the tests' own prefix and a bucket that does not exist.
STACK_ENV = {
    "QUEUES": "default,test-nobody-listens",
    "DATA_URIS_ALLOWED": "s3://trainq/datasets/,s3://trainq/tables/,s3://trainq/weights/,s3://trainq/tests/,s3://no-such-bucket-xyz/",
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The running stack. Its addresses live in ``stack.env`` / ``stack.settings`` only: they are
    not put into this process's environment, where every later LocalStack (the fault-injection
    stack, the fuzzing stack) would take them for servers to share instead of starting its own."""
    with LocalStack(tmp_path_factory.mktemp("stack"), env=STACK_ENV, isolated=True) as running:
        running.seed_digits(DIGITS_URI)
        yield running


@pytest.fixture(scope="session")
def storage(stack: LocalStack) -> Storage:
    """boto3 on the stack's S3 server."""
    return Storage(stack.settings)


@pytest.fixture
def api(stack: LocalStack) -> Iterator[httpx.Client]:
    """An HTTP client on the stack's API."""
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
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
