"""A job's record: its lifecycle (states, allowed transitions, phases) and the public schemas
of the record, its progress and the list view. Plain data: the Redis store is :mod:`shared.jobs`."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

from shared.spec import JobSpec

#: The owner of every request while ``AUTH_REQUIRED`` is off (local, loopback-only use).
ANONYMOUS_OWNER = "local"
#: The Redis hash holding a job's record (written by :mod:`shared.jobs`, read by :mod:`shared.pending`'s scripts).
JOB_KEY = "trainq:job:{}"


class JobState(str, Enum):
    """Where a job is in its life. ``succeeded``, ``failed`` and ``cancelled`` are final.

    ``retrying``: an infrastructure failure (worker lost, S3 or Redis unreachable) sent the job
    back to the queue; it resumes from its newest complete checkpoint. ``preempted``: the
    dispatcher stopped it for a job of higher priority; it waits again (keeping its age) and
    resumes from the checkpoint it saved. ``queued``, ``retrying`` and ``preempted`` jobs are
    pending: the dispatcher (:mod:`shared.scheduler`) sends each to a worker when one is free.
    """

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    PREEMPTED = "preempted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for states a job never leaves."""
        return self in FINAL_STATES

    def __str__(self) -> str:
        # `print(record.state)` shows `succeeded`, as the API writes it (not `JobState.SUCCEEDED`).
        return self.value


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
#: States in which a delivered message may start the job.
STARTABLE_STATES = frozenset({JobState.QUEUED, JobState.RETRYING, JobState.PREEMPTED})

#: The lifecycle: which state may follow which. A queued job can fail without running (it could
#: not be enqueued) or be cancelled before it starts.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RETRYING, JobState.PREEMPTED}),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.PREEMPTED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class Transition(BaseModel):
    """One state change: the new state, when (seconds since the epoch, UTC) and why."""

    state: JobState
    at: float
    reason: str | None = None


class JobPhase(str, Enum):
    """What a running job is doing now (the record's ``progress.phase``), in the order it happens.

    ``downloading``: listing and fetching the data set into the worker's cache (counts in
    ``files_*``/``bytes_*``); ``verifying``: decoding every image once (``files_*``);
    ``building_model``: building the network, loading ``model.weights_uri``, the memory estimate;
    ``training``; ``validating`` (after each epoch); ``uploading``: the final checkpoint and events.
    """

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    BUILDING_MODEL = "building_model"
    TRAINING = "training"
    VALIDATING = "validating"
    UPLOADING = "uploading"


class Progress(BaseModel):
    """How far a job has got. Losses are means over the batches named; times in seconds."""

    phase: JobPhase | None = Field(None, description="What the job is doing now; null before it starts.")
    files_done: int | None = Field(None, description="`downloading`/`verifying`: files done in the current folder.")
    files_total: int | None = Field(None, description="`downloading`/`verifying`: files in the current folder.")
    bytes_done: int | None = Field(None, description="`downloading`: bytes fetched so far.")
    bytes_total: int | None = Field(None, description="`downloading`: bytes to fetch.")
    epoch: int = Field(0, description="Epochs completed.")
    epochs: int = Field(0, description="Epochs in the spec.")
    step: int = Field(0, description="Optimizer steps taken.")
    steps_per_epoch: int = 0
    total_steps: int = 0
    train_loss: float | None = Field(
        None, description="Loss of the latest optimizer step (mean over its micro-batches): noisy, see train_epoch_loss."
    )
    train_epoch_loss: float | None = Field(None, description="Mean training loss over the optimizer steps of the latest epoch.")
    val_loss: float | None = Field(None, description="Mean validation loss after the latest epoch.")
    val_accuracy: float | None = Field(None, description="Validation accuracy after the latest epoch, 0..1.")
    val_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Every validation metric after the latest epoch: val_loss and val_accuracy, val_top5_accuracy "
        "(classification); val_mae, val_rmse, val_r2 (regression).",
    )
    early_stopped: bool = Field(False, description="Training ended early: the early-stopping metric stopped improving.")
    samples_per_s: float | None = Field(
        None, description="Training samples a second of the current attempt, validation included, from its first progress "
        "report after a step (the download, checks, model build and first step don't count); null until two such reports."
    )
    eta_s: float | None = Field(None, description="Estimated seconds left: the steps left at the rate of `samples_per_s`.")
    runtime_s: float = Field(
        0.0,
        description="Seconds the job has run on workers (data download and checks, model build, training, validation, "
        "uploads), summed over attempts: the clock of max_runtime_s.",
    )
    updated_at: float | None = None


class DatasetInfo(BaseModel):
    """What the worker found in the dataset: task, classes in index order and sample counts."""

    task: str = "classification"
    classes: list[str] = Field(description="Class names in label-index order (empty for regression).")
    num_train: int
    num_val: int
    features: list[str] | None = Field(None, description="CSV feature columns, in input order.")


class Artifacts(BaseModel):
    """S3 URIs of what the job wrote."""

    tensorboard: str | None = Field(None, description="Prefix holding the TensorBoard event files.")
    checkpoints: list[str] = Field(default_factory=list, description="Every checkpoint uploaded, oldest first.")
    final_checkpoint: str | None = None
    best_checkpoint: str | None = Field(None, description="`best.pt`, when `checkpoint.best_metric` is set.")


class JobRecord(BaseModel):
    """Everything trainq knows about one job; the public view returned by the API."""

    id: str
    owner: str = Field(ANONYMOUS_OWNER, description="Who submitted it (the token's owner); only they and admins see it.")
    name: str | None = Field(None, description="The spec's `name`.")
    state: JobState
    spec: JobSpec
    queue: str
    created_at: float
    started_at: float | None = Field(None, description="When the first attempt started.")
    finished_at: float | None = None
    transitions: list[Transition] = Field(default_factory=list)
    attempts: int = Field(0, description="Times a worker started the job (1 unless it was retried).")
    duplicate_deliveries: int = Field(0, description="Queue deliveries skipped because the job was already taken.")
    cancel_requested_at: float | None = None
    preempt_requested_at: float | None = Field(
        None, description="When the dispatcher asked this attempt to stop for a job of higher priority."
    )
    resumed_from: str | None = Field(None, description="Checkpoint the latest attempt resumed from.")
    progress: Progress = Field(default_factory=Progress)
    device: str | None = Field(None, description="Where it trained: a CUDA device name or `cpu`.")
    worker: str | None = Field(None, description="Celery worker that ran the latest attempt.")
    dataset: DatasetInfo | None = None
    artifacts: Artifacts = Field(default_factory=Artifacts)
    error: str | None = Field(None, description="Why the job failed (or was retried), naming the file or field at fault.")


#: Fields of the list view: what ``GET /jobs`` returns per job (no spec, dataset or artifacts).
SUMMARY_FIELDS = (
    "id", "owner", "name", "state", "queue", "created_at", "started_at", "finished_at", "attempts", "worker", "progress", "error",
)


class JobSummary(BaseModel):
    """A job in a list: who, what, where it stands. ``GET /jobs/{id}`` has the full record."""

    id: str
    owner: str = ANONYMOUS_OWNER
    name: str | None = None
    state: JobState
    queue: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = Field(None, description="Celery worker that runs (or ran) the latest attempt.")
    progress: Progress = Field(default_factory=Progress)
    error: str | None = None


class JobsPage(BaseModel):
    """A page of job summaries, newest first.

    Follow ``next_cursor`` (pass it as ``cursor``) until it is null. A filtered page may hold
    fewer than ``limit`` jobs while more follow: it stops after examining a bounded number of jobs.
    """

    data: list[JobSummary]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last page.")
    count: int | None = Field(
        None, description="Jobs matching the filters in all; null when several filters combine (not counted)."
    )
