"""trainq's domain errors, in one place. The API maps them to HTTP codes, the worker to job states."""

from __future__ import annotations


class TrainqError(Exception):
    """Base of every trainq error."""


class JobNotFoundError(TrainqError):
    """No job record has this id (the API answers 404)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class InvalidTransitionError(TrainqError):
    """A job state change that the lifecycle forbids, e.g. ``succeeded`` → ``running`` (API: 409)."""

    def __init__(self, job_id: str, current: str, requested: str) -> None:
        super().__init__(f"job {job_id!r} is {current}; it cannot become {requested}")
        self.job_id = job_id
        self.current = current
        self.requested = requested


class JobFailure(TrainqError):
    """An error caused by the job itself (its data or spec), not by the infrastructure.

    Such a job fails at once with this message; retrying it would fail the same way. A dry run
    answers it as a 422 in the shape of a validation error (:meth:`as_error`).

    Args:
        message: what is wrong, naming the spec field, S3 key, file or line at fault.
        field: the spec field at fault as a dotted path (``"dataset.uri"``, ``"batch_size"``,
            ``"dataset.extra_uris.0"``); None when no single field is (``loc`` is ``["body"]``).
        error_type: a short machine-readable kind for the 422's ``type`` (default: the class's).
    """

    error_type = "job_error"

    def __init__(self, message: str, *, field: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        if error_type is not None:
            self.error_type = error_type

    @property
    def loc(self) -> list[str | int]:
        """The request path of :attr:`field`, as in a validation error: ``["body", "dataset", "uri"]``."""
        parts = self.field.split(".") if self.field else []
        return ["body", *(int(part) if part.isdigit() else part for part in parts)]

    def as_error(self) -> dict[str, object]:
        """``{"loc": [...], "msg": ..., "type": ...}``: one item of a 422's ``detail`` list."""
        return {"loc": self.loc, "msg": str(self), "type": self.error_type}


class DatasetError(JobFailure):
    """The dataset a spec points at is missing, empty or malformed. The message names the URI or file."""

    error_type = "dataset_error"


class Interrupted(TrainqError):
    """A long step (listing, download, verification, validation) stopped early because its caller
    asked it to (cancel, time limit, worker shutdown); ``reason`` is what the caller's
    ``should_stop()`` returned."""

    def __init__(self, reason: object) -> None:
        super().__init__(f"interrupted: {getattr(reason, 'value', reason)}")
        self.reason = reason


class IdempotencyConflictError(TrainqError):
    """An ``Idempotency-Key`` was reused with a different spec (API: 409)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used for job {job_id} with a different spec")
        self.key = key
        self.job_id = job_id


class QuotaExceededError(TrainqError):
    """An owner is over a quota: jobs queued or running at once, or submissions per minute (API: 429).

    Attributes:
        retry_after_s: seconds after which a retry may succeed (the ``Retry-After`` header).
    """

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
