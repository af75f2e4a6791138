"""What crosses a trust boundary: user-facing messages without internal addresses, and log lines
without raw control characters (also in the real worker's log)."""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from botocore.config import Config

from shared.sanitize import EscapeControlsFilter, escape_controls, public_message
from shared.storage import Storage
from tests.conftest import wait_for_job
from tests.fixtures import fast_digits_spec, with_dataset
from trainq.stack import free_port


def test_s3_connection_errors_do_not_name_the_endpoint():
    port = free_port()
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(Exception) as caught:
        s3.list_objects_v2(Bucket="trainq")
    assert str(port) in str(caught.value)  # botocore's own message names the endpoint...
    message = public_message(caught.value)
    assert message == "storage unreachable (EndpointConnectionError)"  # ...ours does not


def test_redis_connection_errors_do_not_name_the_host():
    port = free_port()
    with pytest.raises(redis.ConnectionError) as caught:
        redis.Redis(port=port, socket_connect_timeout=1).ping()
    assert str(port) in str(caught.value)
    assert public_message(caught.value) == "job store unavailable (ConnectionError)"


def test_other_errors_keep_their_message_without_urls():
    error = RuntimeError("proxy http://10.0.0.5:9000/trainq?x=1 said no; redis://cache:6379/0 too; at 10.1.2.3:80")
    message = public_message(error)
    assert message.startswith("RuntimeError: proxy <endpoint> said no")
    assert "10.0.0.5" not in message and "cache:6379" not in message and "10.1.2.3" not in message
    assert public_message(ValueError("s3://trainq/datasets/x/ is empty")) == "ValueError: s3://trainq/datasets/x/ is empty"


def test_log_lines_escape_control_characters():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapeControlsFilter())
    logger = logging.getLogger("test_sanitize")
    logger.addHandler(handler)
    try:
        logger.error("job %s: failed: %s", "j1", "class ca\x1b[31mt\r\nERROR forged line")
        try:
            raise ValueError("bad\x1b[2J")
        except ValueError:
            logger.exception("job %s", "j2")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert "job j1: failed: class ca\\x1b[31mt\\r\\nERROR forged line\n" in text
    assert "ValueError: bad\\x1b[2J" in text and "Traceback (most recent call last):\n" in text
    assert escape_controls("tab\there\x85") == "tab\\there\\x85"


def test_the_worker_log_escapes_names_from_data(api: httpx.Client, storage: Storage, stack):
    # Names in a bucket are data, not spec: a class folder may hold ESC (a terminal's "erase
    # line" here) or CR LF (moto refuses those in keys). The job fails naming the folder; the
    # worker's log must show it escaped.
    folder = "ca\x1b[31mt\x1b[2KERROR forged"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / folder).mkdir()
        (root / folder / "notes.txt").write_text("not an image")
        (root / "dog").mkdir()
        from PIL import Image

        Image.new("RGB", (8, 8)).save(root / "dog" / "a.png")
        storage.upload_dir(root, "s3://trainq/datasets/control-chars/")
    job_id = api.post("/jobs", json=with_dataset(fast_digits_spec(), uri="s3://trainq/datasets/control-chars/")).json()["id"]
    job = wait_for_job(api, job_id, timeout_s=60)
    assert job["state"] == "failed"
    deadline = time.monotonic() + 10
    while job_id not in (log := (stack.logs / "worker1.log").read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in log.splitlines() if job_id in line and "failed" in line]
    assert lines, log[-2000:]
    assert "\x1b" not in "\n".join(lines) and "\\x1b[31mt\\x1b[2KERROR forged" in lines[0]
