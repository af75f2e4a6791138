"""Retry or fail: the one place that decides what an exception means for a job.

A job is sent back to the queue only for faults known to be transient: S3 or Redis unreachable,
timing out or throttling (the rows of :data:`TRANSIENT_TYPES` and the S3 error codes below). A
worker that dies, is drained (SIGTERM) or loses its lease is handled elsewhere, and is transient
too: the reaper requeues the job (:mod:`worker.recovery`) or the engine raises
``TrainingStopped``. Everything else fails the job at once: its own faults (bad data, spec or
weights: :class:`~shared.exceptions.JobFailure`, an S3 object it names that is missing or
forbidden, running out of GPU memory, or of shared memory, host memory, disk or open files:
:data:`RESOURCE_FAULTS`) as a job error, and anything unexpected as an *internal*
error whose traceback goes to the worker's log. A retry would fail the same way (Celery's
``autoretry_for`` and boto3's retry modes follow the same rule: retry a short list, never "any
error").

The engine marks where an exception happened with :func:`in_stage` (``download``, ``decode``,
``build model``, ``step 12 (epoch 1)``, ``validation``, ``upload``…), so the job's ``error``
can say which stage failed; :func:`public_message` keeps worker-local paths out of it.
"""

from __future__ import annotations

import contextlib
import errno
import re
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import redis
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import ValidationError

from shared.exceptions import JobFailure


class Fault(str, Enum):
    """What an exception means for the job that raised it."""

    TRANSIENT = "transient"  # infrastructure that may recover: requeue (up to MAX_ATTEMPTS)
    JOB = "job"  # the job's own data, spec or weights: fail at once
    INTERNAL = "internal"  # unexpected (a bug, a library error): fail at once, traceback in the log


#: Exception types that mean "S3 or Redis could not be reached or timed out". botocore's
#: ``ConnectionError`` covers EndpointConnectionError and ConnectTimeoutError; its
#: ``HTTPClientError`` covers ReadTimeoutError and ConnectionClosedError (botocore's own
#: ``standard`` retry mode treats both families as transient). redis-py's ConnectionError
#: covers a server that is restarting (BusyLoadingError).
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    BotoConnectionError,
    HTTPClientError,
    redis.ConnectionError,
    redis.TimeoutError,
)

#: S3 error codes that mean "slow down" or "try again" (AWS's throttling and transient codes, as
#: botocore's ``standard`` retry mode lists them), plus every HTTP status >= 500.
S3_TRANSIENT_CODES = frozenset(
    {
        "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
        "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestThrottled",
        "SlowDown", "PriorRequestNotComplete", "RequestTimeout", "RequestTimeoutException", "InternalError",
        "ServiceUnavailable", "429",
    }
)

#: Exceptions that only wrap another: classified by what they wrap (``__cause__``, else
#: ``__context__``; boto3's RetriesExceededError by ``last_exception``).
_WRAPPERS = (RetriesExceededError, S3UploadFailedError)
_STAGE_ATTR = "_trainq_stage"


# -- resource faults of the job's own making ---------------------------------------------------

#: Exhausted resources a job's own settings drive (its DataLoader workers, batch, data): a job error
#: with advice, not an internal error (a retry on the same worker would fail the same way). Each
#: row: a test on the exception, and what the job's ``error`` says.
_DATALOADER_KILLED = re.compile(r"DataLoader worker \(pid\(?s?\)? [\d, ]+\) is killed by signal: (?P<signal>[\w ]+)")
_ADVICE = "lower performance.prefetch_factor, num_workers or batch_size"
RESOURCE_FAULTS: tuple[tuple[Callable[[BaseException], bool], str], ...] = (
    (
        lambda exc: _killed_by(exc) == "Bus error",
        (
            "a DataLoader worker ran out of shared memory (SIGBUS; /dev/shm is too small for its batches): "
            f"{_ADVICE}, or give the worker a larger /dev/shm (docker run --shm-size)"
        ),
    ),
    (
        lambda exc: _killed_by(exc) == "Killed",
        f"a DataLoader worker was killed (SIGKILL: usually the host ran out of memory): {_ADVICE}",
    ),
    (
        lambda exc: isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc)
        or "DefaultCPUAllocator: not enough memory" in str(exc),
        "out of host memory: lower batch_size, dataset.image_size or num_workers, or pick a smaller model.arch",
    ),
    (
        lambda exc: isinstance(exc, OSError) and exc.errno == errno.ENOSPC,
        (
            "the worker's disk is full (its data cache holds the job's dataset and checkpoints): use a smaller dataset, "
            "or ask the operator for a larger DATA_CACHE_DIR"
        ),
    ),
    (
        lambda exc: (isinstance(exc, OSError) and exc.errno == errno.EMFILE) or "received 0 items of ancdata" in str(exc),
        (
            f"too many open files (each DataLoader worker shares batches through file descriptors): {_ADVICE}, "
            "or ask the operator to raise the worker's open-file limit (ulimit -n)"
        ),
    ),
)


def _killed_by(exc: BaseException) -> str | None:
    match = _DATALOADER_KILLED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    return match["signal"].strip().rstrip(".") if match else None


def resource_fault(exc: BaseException) -> str | None:
    """The job's ``error`` text when ``exc``, or one it was raised ``from``, is a resource the
    job exhausted (shared memory, host memory, disk, open files), else None. (torch's DataLoader
    raises "worker exited unexpectedly" from the "killed by signal: Bus error" that says why.)"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = next((message for test, message in RESOURCE_FAULTS if test(current)), None)
        if message is not None:
            return message
        current = current.__cause__  # not __context__: a bug while handling a full disk is still a bug
    return None


def _classify_one(exc: BaseException) -> Fault | None:
    if isinstance(exc, JobFailure | ValidationError):
        return Fault.JOB
    if resource_fault(exc) is not None:
        return Fault.JOB
    if isinstance(exc, TRANSIENT_TYPES):
        return Fault.TRANSIENT
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if error.get("Code") in S3_TRANSIENT_CODES or status >= 500 or status == 429:
            return Fault.TRANSIENT
        # 4xx: the object or bucket the job names is missing or forbidden; asking again will not help.
        if 400 <= status < 500 or error.get("Code") in {"NoSuchKey", "NoSuchBucket", "AccessDenied", "404", "403"}:
            return Fault.JOB
        return Fault.INTERNAL
    if _is_cuda_oom(exc):
        return Fault.JOB
    # UploadError by name: importing worker.training.uploads here would be an import cycle.
    if isinstance(exc, _WRAPPERS) or type(exc).__name__ == "UploadError":
        return None  # look at what it wraps
    return Fault.INTERNAL


def _is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never import torch here: the API classifies too
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _wrapped(exc: BaseException) -> BaseException | None:
    if isinstance(exc, RetriesExceededError) and isinstance(getattr(exc, "last_exception", None), BaseException):
        return exc.last_exception
    return exc.__cause__ or exc.__context__


def classify(exc: BaseException) -> Fault:
    """Whether ``exc`` is transient (retry the job), the job's fault, or internal (both fail at once).

    Wrappers (boto3's RetriesExceededError and S3UploadFailedError, the uploader's UploadError)
    are classified by the exception they wrap; a wrapper of nothing known is internal.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = _classify_one(current)
        if kind is not None:
            return kind
        current = _wrapped(current)
    return Fault.INTERNAL


def describe(exc: BaseException) -> str:
    """A short reason for a transient or job fault, without endpoints, hosts or local paths.

    ``"storage (S3) unreachable: EndpointConnectionError"``, ``"storage (S3) throttled or
    failing: SlowDown"``, ``"job store (Redis) unreachable: ConnectionError"``,
    ``"out of GPU memory: …"``; otherwise ``"<Type>: <message>"``.
    """
    current: BaseException | None = exc
    while current is not None and _classify_one(current) is None:
        current = _wrapped(current)
    current = current or exc
    name = type(current).__name__
    if isinstance(current, BotoConnectionError | HTTPClientError):
        return f"storage (S3) unreachable: {name}"
    if isinstance(current, redis.ConnectionError | redis.TimeoutError):
        return f"job store (Redis) unreachable: {name}"
    if isinstance(current, ClientError):
        code = current.response.get("Error", {}).get("Code", "?")
        operation = getattr(current, "operation_name", "request")
        if classify(current) is Fault.TRANSIENT:
            return f"storage (S3) throttled or failing: {code} on {operation}"
        return f"storage (S3) refused {operation}: {code}"
    if _is_cuda_oom(current):
        return "out of GPU memory: lower batch_size or dataset.image_size, or pick a smaller model.arch"
    if (resource := resource_fault(current)) is not None:
        return resource
    return f"{name}: {current}"


# -- stages ----------------------------------------------------------------------------------


@contextlib.contextmanager
def in_stage(name: str) -> Iterator[None]:
    """Mark exceptions raised inside as having happened in stage ``name`` (the innermost wins).

    Usable as a context manager or a decorator: ``@in_stage("download")``.
    """
    try:
        yield
    except BaseException as exc:
        mark_stage(exc, name)
        raise


def mark_stage(exc: BaseException, name: str) -> None:
    """Record ``name`` as ``exc``'s stage unless an inner stage already did."""
    if getattr(exc, _STAGE_ATTR, None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, _STAGE_ATTR, name)


def stage_of(exc: BaseException) -> str | None:
    """The stage :func:`in_stage` recorded on ``exc``, if any."""
    return getattr(exc, _STAGE_ATTR, None)


# -- messages --------------------------------------------------------------------------------

#: torch's DataLoader re-raises a worker process's exception as
#: "Caught X in DataLoader worker process N.\nOriginal Traceback (most recent call last): …";
#: the message users need is the last line.
_DATALOADER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback", re.S)


def public_message(text: str, cache_dir: Path | None = None, data_root: Path | None = None) -> str:
    """``text`` fit for a job's ``error``: no worker-local paths, no DataLoader traceback.

    A path in the dataset cache (``<cache_dir>/datasets/<content hash>/<key>``) becomes the S3
    URI it was downloaded from (each complete download folder records it in ``.complete``);
    any other path under ``cache_dir`` becomes ``<worker cache>/…``, a path under
    ``data_root`` becomes ``local://…``.
    """
    if _DATALOADER_WRAPPED.match(text):
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    for root, replace in ((cache_dir, _cache_path_uri), (data_root, _local_uri)):
        if root is None:
            continue
        for form in {str(root), str(root.resolve())}:
            pattern = re.compile(re.escape(form.rstrip("/")) + r"(/[^\s'\"),;:]*)?")
            text = pattern.sub(lambda match, root=root: replace(root, match.group(1) or ""), text)
    return text


def _cache_path_uri(cache_dir: Path, relative: str) -> str:
    parts = relative.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "datasets":
        marker = cache_dir / "datasets" / parts[1] / ".complete"
        with contextlib.suppress(OSError):
            uri = marker.read_text().strip()
            return uri.rstrip("/") + ("/" + "/".join(parts[2:]) if parts[2:] else "/")
    return "<worker cache>" + relative


def _local_uri(data_root: Path, relative: str) -> str:
    return "local://" + relative.strip("/")


def job_error(exc: BaseException, cache_dir: Path | None = None, data_root: Path | None = None) -> tuple[Fault, str]:
    """``(kind, message)`` for the job record of a job that raised ``exc``.

    A :class:`~shared.exceptions.JobFailure` keeps its own words (they name the field, key or
    line). Other faults say their stage: ``"download: storage (S3) unreachable:
    EndpointConnectionError"``, ``"internal error in step 12 (epoch 1): KeyError: 'x' (traceback
    in the worker log)"``. Paths are mapped as :func:`public_message` does.
    """
    kind = classify(exc)
    stage = stage_of(exc)
    if isinstance(exc, JobFailure | ValidationError):
        text = str(exc)
    elif kind is Fault.INTERNAL:
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = describe(exc)
    text = public_message(text, cache_dir, data_root)
    if kind is Fault.INTERNAL:
        return kind, f"internal error{f' in {stage}' if stage else ''}: {text} (traceback in the worker log)"
    if stage and not isinstance(exc, JobFailure | ValidationError):
        return kind, f"{stage}: {text}"
    return kind, text
