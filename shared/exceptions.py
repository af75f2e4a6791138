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

    Such a job fails at once with this message; retrying it would fail the same way.
    """


class DatasetError(JobFailure):
    """The dataset a spec points at is missing, empty or malformed. The message names the URI or file."""


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
