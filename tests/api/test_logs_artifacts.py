"""Job logs (whole and followed as server-sent events) and artifacts with presigned URLs, on a real
job run by the session stack's worker, driven through the Python client (:mod:`trainq.client`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from shared.auth import TokenStore
from shared.records import JobState
from shared.storage import Storage
from tests.fixtures import example_spec, fast_digits_spec, with_dataset
from trainq.client import AsyncClient, Client, TrainqClientError
from trainq.stack import LocalStack


@pytest.fixture(scope="module")
def client(stack: LocalStack, api_token: str):
    with Client(stack.api_url, api_token) as each:
        yield each


@pytest.fixture(scope="module")
def followed(client: Client):
    """One short job (DataLoader workers on), its log followed from submission until it ended."""
    job = client.submit(fast_digits_spec(epochs=1, name="logged"))
    ended: dict = {}
    lines = list(client.follow_logs(job.id, on_end=ended.update))
    return client.get(job.id), lines, ended


def test_following_a_log_streams_the_attempt_until_the_job_ends(followed):
    record, lines, ended = followed
    assert ended == {"state": "succeeded", "error": None} and record.state is JobState.SUCCEEDED
    assert lines[0].startswith(f"trainq: job {record.id}, attempt 1, on worker worker1@")
    assert any("worker.training.engine" in line and "epoch 1/1 val_loss" in line for line in lines)
    assert "succeeded" in lines[-1]
    assert not any("127.0.0.1" in line for line in lines)


def test_the_whole_log_is_what_was_followed(followed, client: Client):
    record, lines, _ = followed
    assert client.logs(record.id) == "\n".join(lines) + "\n"
    assert client.logs(record.id, attempt=1) == "\n".join(lines) + "\n"
    with pytest.raises(TrainqClientError, match="404 job .* has no log for attempt 2"):
        client.logs(record.id, attempt=2)


def test_a_follow_resumes_after_last_event_id(followed, client: Client):
    record, lines, _ = followed
    first = len((lines[0] + "\n").encode())
    response = client.http.get(f"/jobs/{record.id}/logs", params={"follow": "true"}, headers={"Last-Event-ID": f"1:{first}"})
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[: len(lines) - 1] == lines[1:] and '"succeeded"' in data[-1]


def test_a_failed_jobs_log_says_why(client: Client):
    job = client.submit(with_dataset(fast_digits_spec(), uri="s3://trainq/datasets/nothing-here/"))
    record = job.wait(timeout_s=120)
    assert record.state is JobState.FAILED
    log = client.logs(job.id)
    assert "s3://trainq/datasets/nothing-here/ is empty" in log and "WARNING worker.tasks" in log


def test_artifacts_come_with_presigned_urls_that_need_no_credentials(followed, client: Client, storage: Storage, stack):
    record, _, _ = followed
    listing = client.artifacts(record.id)
    assert listing.prefix == f"s3://trainq/jobs/{record.id}/"
    paths = {item.path for item in listing.files}
    assert {"checkpoints/final.pt", "logs/attempt-1.log"} <= paths
    assert any(path.startswith("tensorboard/") for path in paths)
    assert listing.expires_in_s == 3600 and abs(listing.expires_at - (time.time() + 3600)) < 120
    for item in listing.files:
        assert item.url.startswith(stack.env["S3_ENDPOINT_URL"]) and "X-Amz-Signature=" in item.url
        body = httpx.get(item.url).content  # no token, no S3 credentials
        assert len(body) == item.size_bytes
    final = next(item for item in listing.files if item.path == "checkpoints/final.pt")
    bucket_copy = storage.client.get_object(Bucket="trainq", Key=f"jobs/{record.id}/checkpoints/final.pt")["Body"].read()
    assert httpx.get(final.url).content == bucket_copy


def test_download_artifacts_copies_every_file(followed, client: Client, tmp_path: Path):
    record, _, _ = followed
    files = client.download_artifacts(record.id, tmp_path)
    listing = {item.path: item.size_bytes for item in client.artifacts(record.id).files}
    # Into <dest>/<job_id>/, as `trainq artifacts ID --download DEST` (issue 20 item 5).
    assert {str(path.relative_to(tmp_path / record.id)): path.stat().st_size for path in files} == listing


def test_another_owner_gets_404_for_logs_and_artifacts(followed, stack: LocalStack):
    record, _, _ = followed
    with Client(stack.api_url, stack.create_token("nosy")) as nosy:
        for call in (nosy.logs, nosy.artifacts, lambda job_id: list(nosy.follow_logs(job_id))):
            with pytest.raises(TrainqClientError, match="^404 job .* not found"):
                call(record.id)


def test_workers_count_their_jobs_and_uploads(followed, client: Client):
    deadline = time.monotonic() + 10
    while True:  # the worker reports every second on this stack
        worker = next(w for w in client.workers() if w.name.startswith("worker1@"))
        if worker.metrics.jobs_total.get("succeeded", 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert worker.metrics.jobs_total.get("succeeded", 0) >= 1
    assert worker.metrics.upload_bytes_total > 800_000  # at least the final checkpoint


def test_the_async_client_reads_lists_and_waits(followed, stack: LocalStack, api_token: str):
    record, _, _ = followed

    async def main():
        async with AsyncClient(stack.api_url, api_token) as aclient:
            return await aclient.wait(record.id), await aclient.list(state="succeeded", name="logged")

    again, page = asyncio.run(main())
    assert again.id == record.id and again.state is JobState.SUCCEEDED
    assert record.id in [job.id for job in page.data]


def test_revoking_a_token_ends_its_open_log_streams(stack):
    owner = f"revoked-{uuid.uuid4().hex[:8]}"
    token = stack.create_token(owner)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=httpx.Timeout(30, read=120)) as http:
        job = http.post("/jobs", json=example_spec() | {"queue": "test-nobody-listens"}).json()  # stays queued

        def follow() -> list[str]:
            give_up = time.monotonic() + 60  # pings every 15 s let the loop look at it
            with http.stream("GET", f"/jobs/{job['id']}/logs", params={"follow": "true"}) as response:
                assert response.status_code == 200
                events = []
                for line in response.iter_lines():
                    events += [line] if line.startswith(("event:", "data:")) else []
                    if time.monotonic() > give_up:
                        return events + ["(still open)"]
                return events

        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(follow)
            time.sleep(1)  # the stream is open
            assert not stream.done()
            TokenStore(redis.Redis.from_url(stack.env["REDIS_URL"])).revoke(owner=owner)
            events = stream.result()  # before: it went on until the job ended (this one never starts)
    assert events[-2:] == ["event: end", 'data: {"state": "queued", "error": "the bearer token was revoked; the stream ended"}']
