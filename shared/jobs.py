"""Job records in Redis: state, timestamps, progress, device, error and artifact URIs.

A record is a Redis hash ``trainq:job:<id>`` whose fields are JSON values; the sorted set
``trainq:jobs`` (score: creation time, seconds since the epoch) lists ids newest first.
State changes go through :meth:`JobStore.transition`, which checks the lifecycle in a Redis
transaction (WATCH/MULTI), so the API and a worker never both win a race.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import Enum
from typing import Any

import redis
from pydantic import BaseModel, Field

from shared.exceptions import InvalidTransitionError, JobNotFoundError
from shared.spec import JobSpec

JOB_KEY = "trainq:job:{}"
INDEX_KEY = "trainq:jobs"


class JobState(str, Enum):
    """Where a job is in its life. ``succeeded`` and ``failed`` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """True for states a job never leaves."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED})

#: The lifecycle: which state may follow which. A queued job can fail without running
#: (it could not be enqueued); anything else fails or succeeds only from ``running``.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
}


class Transition(BaseModel):
    """One state change: the new state and when it happened (seconds since the epoch, UTC)."""

    state: JobState
    at: float


class Progress(BaseModel):
    """How far a running job has got. Losses are means over the batches named; times in seconds."""

    epoch: int = Field(0, description="Epochs completed.")
    epochs: int = Field(0, description="Epochs in the spec.")
    step: int = Field(0, description="Optimizer steps taken.")
    steps_per_epoch: int = 0
    total_steps: int = 0
    train_loss: float | None = Field(None, description="Loss of the latest training batch.")
    val_loss: float | None = Field(None, description="Mean validation loss after the latest epoch.")
    val_accuracy: float | None = Field(None, description="Validation accuracy after the latest epoch, 0..1.")
    samples_per_s: float | None = Field(None, description="Training throughput since the job started.")
    eta_s: float | None = Field(None, description="Estimated seconds left, from the throughput so far.")
    updated_at: float | None = None


class DatasetInfo(BaseModel):
    """What the worker found in the dataset: classes in index order and sample counts."""

    classes: list[str]
    num_train: int
    num_val: int


class Artifacts(BaseModel):
    """S3 URIs of what the job wrote."""

    tensorboard: str | None = Field(None, description="Prefix holding the TensorBoard event files.")
    checkpoints: list[str] = Field(default_factory=list, description="Every checkpoint uploaded, oldest first.")
    final_checkpoint: str | None = None


class JobRecord(BaseModel):
    """Everything trainq knows about one job; the public view returned by the API."""

    id: str
    state: JobState
    spec: JobSpec
    queue: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    transitions: list[Transition] = Field(default_factory=list)
    progress: Progress = Field(default_factory=Progress)
    device: str | None = Field(None, description="Where it trained: a CUDA device name or `cpu`.")
    worker: str | None = Field(None, description="Host name of the Celery worker that ran it.")
    dataset: DatasetInfo | None = None
    artifacts: Artifacts = Field(default_factory=Artifacts)
    error: str | None = Field(None, description="Why the job failed, naming the file or field at fault.")


# Fields stored as JSON in the hash; the rest are plain strings.
_JSON_FIELDS = {"spec", "transitions", "progress", "dataset", "artifacts", "created_at", "started_at", "finished_at"}


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif isinstance(value, Enum):
            value = value.value
        out[name] = json.dumps(value) if name in _JSON_FIELDS else ("" if value is None else str(value))
    return out


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name, text = key.decode(), value.decode()
        if name in _JSON_FIELDS:
            data[name] = json.loads(text)
        else:
            data[name] = text or None
    return data


class JobStore:
    """Creates, reads and updates job records in Redis.

    Args:
        client: a ``redis.Redis`` connected to the job database (``REDIS_URL``).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        """A store on a new connection pool to ``url`` (``redis://host:port/db``)."""
        return cls(redis.Redis.from_url(url))

    def create(self, spec: JobSpec, queue: str) -> JobRecord:
        """Record a new ``queued`` job for ``spec`` on ``queue`` and return it."""
        now = time.time()
        record = JobRecord(
            id=uuid.uuid4().hex,
            state=JobState.QUEUED,
            spec=spec,
            queue=queue,
            created_at=now,
            progress=Progress(epochs=spec.epochs),
            transitions=[Transition(state=JobState.QUEUED, at=now)],
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(JOB_KEY.format(record.id), mapping=_encode(record.model_dump(mode="json", exclude_none=True)))
        pipe.zadd(INDEX_KEY, {record.id: now})
        pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord:
        """The record of ``job_id``.

        Raises:
            JobNotFoundError: no such job.
        """
        raw = self.redis.hgetall(JOB_KEY.format(job_id))
        if not raw:
            raise JobNotFoundError(job_id)
        return JobRecord.model_validate(_decode(raw))

    def list(self, *, limit: int = 20, offset: int = 0) -> tuple[list[JobRecord], int]:
        """Up to ``limit`` records, newest first, skipping ``offset``; and the total job count."""
        ids = self.redis.zrevrange(INDEX_KEY, offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(JOB_KEY.format(job_id.decode()))
        records = [JobRecord.model_validate(_decode(raw)) for raw in pipe.execute() if raw]
        return records, self.redis.zcard(INDEX_KEY)

    def transition(self, job_id: str, state: JobState, **fields: Any) -> JobRecord:
        """Move ``job_id`` to ``state``, setting ``fields`` in the same transaction.

        The change is timestamped in ``transitions``; ``started_at``/``finished_at`` are set on
        entering ``running`` and a final state.

        Raises:
            JobNotFoundError: no such job.
            InvalidTransitionError: the lifecycle forbids going from the current state to ``state``.
        """
        key = JOB_KEY.format(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not raw:
                        raise JobNotFoundError(job_id)
                    current = _decode(raw)
                    previous = JobState(current["state"])
                    if state not in ALLOWED_TRANSITIONS[previous]:
                        raise InvalidTransitionError(job_id, previous.value, state.value)
                    now = time.time()
                    update = dict(fields, state=state.value)
                    update["transitions"] = current["transitions"] + [{"state": state.value, "at": now}]
                    if state is JobState.RUNNING:
                        update["started_at"] = now
                    if state.is_final:
                        update["finished_at"] = now
                    pipe.multi()
                    pipe.hset(key, mapping=_encode(update))
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set ``fields`` (progress, device, dataset, artifacts…) without changing the state.

        Raises:
            JobNotFoundError: no such job (an update never creates a record).
        """
        key = JOB_KEY.format(job_id)
        # HSET on a missing key would create a half record; only write fields of an existing one.
        script = self.redis.register_script(_UPDATE_IF_EXISTS)
        flat: list[str] = []
        for name, value in _encode(fields).items():
            flat += [name, value]
        if not script(keys=[key], args=flat):
            raise JobNotFoundError(job_id)


_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
