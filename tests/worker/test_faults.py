"""Retry or fail, decided in one place (worker.faults): a table of exception kinds, the stage an
error names, and messages without worker-local paths. Unit tests: the stack adds nothing here."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import redis
import torch
from boto3.exceptions import RetriesExceededError
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from pydantic import ValidationError

from shared.exceptions import DatasetError, JobFailure
from shared.spec import JobSpec
from worker.faults import Fault, classify, describe, in_stage, job_error, public_message, stage_of
from worker.training.uploads import UploadError

ENDPOINT = "http://10.1.2.3:9000"


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def wrapped(outer: type[BaseException], inner: BaseException, *args) -> BaseException:
    try:
        raise inner
    except BaseException as cause:
        try:
            raise outer(*args) from cause
        except BaseException as exc:
            return exc


def raised_while_handling(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        raise inner
    except BaseException:
        try:
            raise outer
        except BaseException as exc:
            return exc


def validation_error() -> ValidationError:
    try:
        JobSpec.model_validate({"dataset": {"uri": "s3://trainq/d/"}, "epochs": 0})
    except ValidationError as exc:
        return exc
    raise AssertionError("no error")


def dataloader_death(signal_name: str) -> RuntimeError:
    """What torch's DataLoader raises when a worker dies of a signal: "exited unexpectedly", raised
    from the "killed by signal" error its SIGCHLD handler raised."""
    try:
        try:
            raise RuntimeError(
                f"DataLoader worker (pid 4242) is killed by signal: {signal_name}. It is possible that dataloader's "
                "workers are out of shared memory. Please try to raise your shared memory limit."
            )
        except RuntimeError as cause:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly") from cause
    except RuntimeError as exc:
        return exc


FAULTS = [
    # S3 and Redis unreachable, timing out or throttling: transient.
    ("s3 endpoint unreachable", EndpointConnectionError(endpoint_url=ENDPOINT), Fault.TRANSIENT),
    ("s3 connect timeout", ConnectTimeoutError(endpoint_url=ENDPOINT), Fault.TRANSIENT),
    ("s3 read timeout", ReadTimeoutError(endpoint_url=ENDPOINT), Fault.TRANSIENT),
    ("s3 connection closed", ConnectionClosedError(endpoint_url=ENDPOINT), Fault.TRANSIENT),
    ("s3 SlowDown", client_error("SlowDown", 503, "PutObject"), Fault.TRANSIENT),
    ("s3 500", client_error("InternalError", 500), Fault.TRANSIENT),
    ("s3 throttling 400", client_error("Throttling", 400), Fault.TRANSIENT),
    ("s3 429", client_error("TooManyRequests", 429), Fault.TRANSIENT),
    ("redis down", redis.ConnectionError("Error 111 connecting"), Fault.TRANSIENT),
    ("redis timeout", redis.TimeoutError("Timeout reading"), Fault.TRANSIENT),
    ("redis loading", redis.BusyLoadingError("loading"), Fault.TRANSIENT),
    ("boto3 retries exceeded", RetriesExceededError(EndpointConnectionError(endpoint_url=ENDPOINT)), Fault.TRANSIENT),
    ("upload deadline passed", wrapped(UploadError, EndpointConnectionError(endpoint_url=ENDPOINT), "upload failed"), Fault.TRANSIENT),
    # The job's own fault: fail at once.
    ("job failure", JobFailure("model.num_classes is 3"), Fault.JOB),
    ("dataset error", DatasetError("s3://b/x line 3 has 4 field(s)"), Fault.JOB),
    ("spec no longer valid", validation_error(), Fault.JOB),
    ("s3 object missing", client_error("404", 404, "HeadObject"), Fault.JOB),
    ("s3 no such key", client_error("NoSuchKey", 404), Fault.JOB),
    ("s3 forbidden", client_error("AccessDenied", 403), Fault.JOB),
    ("cuda out of memory", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), Fault.JOB),
    # Resources the job exhausted (issue 19): shared memory, host memory, disk, open files.
    ("shm: loader worker SIGBUS", dataloader_death("Bus error"), Fault.JOB),
    ("loader worker OOM-killed", dataloader_death("Killed"), Fault.JOB),
    ("host memory", RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory"), Fault.JOB),
    ("python memory", MemoryError(), Fault.JOB),
    ("disk full", OSError(errno.ENOSPC, "No space left on device"), Fault.JOB),
    ("too many open files", OSError(errno.EMFILE, "Too many open files"), Fault.JOB),
    ("fd passing failed", RuntimeError("received 0 items of ancdata"), Fault.JOB),
    # Anything else: internal, fail at once (the examples, before their own fixes).
    ("batchnorm batch of one", ValueError("Expected more than 1 value per channel when training"), Fault.INTERNAL),
    ("csv row missing target", TypeError("float() argument must be a string or a real number, not 'NoneType'"), Fault.INTERNAL),
    ("object shadows a folder", IsADirectoryError(errno.EISDIR, "Is a directory"), Fault.INTERNAL),
    ("name too long", OSError(errno.ENAMETOOLONG, "File name too long"), Fault.INTERNAL),
    ("a bug", KeyError("scheduler"), Fault.INTERNAL),
    ("bug while handling an outage", raised_while_handling(redis.ConnectionError("x"), KeyError("y")), Fault.INTERNAL),
    ("local file missing", UploadError("upload of s3://b/k: local file /tmp/x is missing"), Fault.INTERNAL),
    ("unknown s3 code", ClientError({"Error": {"Code": "Weird"}}, "GetObject"), Fault.INTERNAL),
]


@pytest.mark.parametrize(("exc", "kind"), [(exc, kind) for _, exc, kind in FAULTS], ids=[name for name, _, _ in FAULTS])
def test_only_known_transient_faults_are_retried(exc: BaseException, kind: Fault):
    assert classify(exc) is kind


def test_transient_reasons_name_the_service_not_its_address():
    for exc in (EndpointConnectionError(endpoint_url=ENDPOINT), RetriesExceededError(EndpointConnectionError(endpoint_url=ENDPOINT))):
        assert describe(exc) == "storage (S3) unreachable: EndpointConnectionError"
    assert describe(client_error("SlowDown", 503, "PutObject")) == "storage (S3) throttled or failing: SlowDown on PutObject"
    assert describe(redis.ConnectionError("Error 111 connecting to 10.0.0.7:6379")) == "job store (Redis) unreachable: ConnectionError"
    kind, message = job_error(_staged(EndpointConnectionError(endpoint_url=ENDPOINT), "download"))
    assert (kind, message) == (Fault.TRANSIENT, "download: storage (S3) unreachable: EndpointConnectionError")
    assert "10.1.2.3" not in message


def _staged(exc: BaseException, *stages: str) -> BaseException:
    def nest(remaining: list[str]) -> None:
        if not remaining:
            raise exc
        with in_stage(remaining[0]):
            nest(remaining[1:])

    try:
        nest(list(stages))
    except BaseException as caught:
        return caught
    raise AssertionError("not raised")


def test_an_unexpected_error_fails_once_naming_its_innermost_stage():
    exc = _staged(KeyError("scheduler"), "step 12 (epoch 1)", "validation")
    assert stage_of(exc) == "validation"
    assert job_error(exc) == (Fault.INTERNAL, "internal error in validation: KeyError: 'scheduler' (traceback in the worker log)")
    # A job failure keeps its own words (they already name the field, key or line).
    assert job_error(_staged(DatasetError("s3://b/t.csv line 7 has 5 field(s); the header has 4"), "read data")) == (
        Fault.JOB, "s3://b/t.csv line 7 has 5 field(s); the header has 4"
    )


def test_worker_local_paths_become_uris(tmp_path: Path):
    cache = tmp_path / "cache"
    download = cache / "datasets" / "0123abcd"
    download.mkdir(parents=True)
    (download / ".complete").write_text("s3://trainq/datasets/pets/\n")
    root = tmp_path / "data-root"
    error = OSError(errno.EISDIR, "Is a directory", str(download / "cat" / "x.png"))
    kind, message = job_error(_staged(error, "download"), cache, root)
    assert kind is Fault.INTERNAL
    assert message == "internal error in download: IsADirectoryError: [Errno 21] Is a directory: 's3://trainq/datasets/pets/cat/x.png' (traceback in the worker log)"
    assert public_message(f"open {cache}/jobs/j1/tensorboard failed", cache) == "open <worker cache>/jobs/j1/tensorboard failed"
    assert public_message(f"cannot read {root}/shapes/a.png", cache, root) == "cannot read local://shapes/a.png"
    assert str(tmp_path) not in message


def test_a_dataloader_workers_traceback_is_cut_to_its_message():
    text = (
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "/site-packages/torch/utils/data/_utils/worker.py", line 349, in _worker_loop\n'
        "    data = fetcher.fetch(index)\n"
        "shared.exceptions.DatasetError: cannot read image s3://trainq/x/a/1.png: broken\n"
    )
    assert public_message(text) == "cannot read image s3://trainq/x/a/1.png: broken"


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (dataloader_death("Bus error"), "a DataLoader worker ran out of shared memory (SIGBUS"),
        (dataloader_death("Killed"), "a DataLoader worker was killed (SIGKILL: usually the host ran out of memory)"),
        (OSError(errno.ENOSPC, "No space left on device"), "the worker's disk is full"),
        (OSError(errno.EMFILE, "Too many open files"), "too many open files"),
        (MemoryError(), "out of host memory"),
    ],
)
def test_a_resource_the_job_exhausted_is_a_job_error_with_advice(exc: BaseException, words: str):
    with pytest.raises(type(exc)) as info, in_stage("step 3 (epoch 1)"):
        raise exc
    kind, message = job_error(info.value)
    assert kind is Fault.JOB and message.startswith(f"step 3 (epoch 1): {words}") and "internal error" not in message


def test_a_bug_while_handling_a_full_disk_is_still_internal():
    assert classify(raised_while_handling(OSError(errno.ENOSPC, "full"), KeyError("y"))) is Fault.INTERNAL
