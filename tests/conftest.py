"""Session fixtures: one real local stack (redis-server, moto S3 server, uvicorn API, a Celery
worker process) shared by the tests that need it. Nothing is mocked."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The running stack; its environment (REDIS_URL, S3_ENDPOINT_URL, S3_ENDPOINT, AWS keys)
    is also set in this process so boto3 and TensorBoard's S3 reader find the bucket."""
    workdir = tmp_path_factory.mktemp("stack")
    with LocalStack(workdir) as running:
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in running.env.items() if k not in saved or k.startswith(("S3_", "AWS_", "REDIS_"))})
        running.seed_digits(DIGITS_URI)
        try:
            yield running
        finally:
            os.environ.clear()
            os.environ.update(saved)


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
