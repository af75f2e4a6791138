"""Bodies of the API's answers besides the job record (:mod:`shared.records`): worker status, artifacts,
logs, errors, and the worker's reports (memory estimate, dry run); shared by the API, the worker
and the Python client (:mod:`trainq.client`). Plain data: no Redis."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class GpuInfo(BaseModel):
    """One CUDA device as ``torch.cuda`` reports it."""

    index: int
    name: str = Field(description="e.g. `NVIDIA H200`.")
    memory_bytes: int = Field(description="Total device memory in bytes.")


class DeviceInfo(BaseModel):
    """What a worker trains on: ``torch.cuda.is_available()`` and, with CUDA, its GPUs."""

    cuda_available: bool
    cuda_version: str | None = Field(None, description="CUDA version torch was built with (`torch.version.cuda`).")
    torch_version: str | None = None
    gpus: list[GpuInfo] = Field(default_factory=list, description="Visible GPUs (`CUDA_VISIBLE_DEVICES`).")


class WorkerMetrics(BaseModel):
    """The worker's counters and latest rates since it started (exported on the API's `/metrics`)."""

    samples_per_s: float | None = Field(None, description="Training throughput of the current job, samples/s.")
    step_time_s: float | None = Field(None, description="Mean seconds per optimizer step since the previous progress report.")
    upload_bytes_total: int = Field(0, description="Bytes uploaded to S3 (checkpoints, events, logs).")
    jobs_total: dict[str, int] = Field(default_factory=dict, description="Attempts ended, by outcome (job state).")


class WorkerStatus(BaseModel):
    """A live worker, as it last reported itself."""

    name: str = Field(description="Celery node name, e.g. `gpu0@node-7`.")
    host: str
    pid: int
    queues: list[str]
    device: DeviceInfo
    current_job: str | None = Field(None, description="Id of the job it is training, if any.")
    started_at: float = Field(description="When the worker started (seconds since the epoch).")
    last_heartbeat: float = Field(description="When it last reported (seconds since the epoch).")
    metrics: WorkerMetrics = Field(default_factory=WorkerMetrics)

class ErrorDetail(BaseModel):
    """Every error but a 422: one sentence saying what is wrong."""

    detail: str


class ArtifactFile(BaseModel):
    """One object a job wrote, with a presigned download URL."""

    path: str = Field(description="Path under the job's prefix, e.g. `checkpoints/final.pt`.")
    uri: str = Field(description="`s3://` URI of the object.")
    size_bytes: int
    last_modified: float = Field(description="Seconds since the epoch.")
    url: str = Field(description="Presigned HTTP GET URL: downloads without credentials until `expires_at`.")


class ArtifactList(BaseModel):
    """Everything under ``s3://<bucket>/<prefix>/<job_id>/``: checkpoints, TensorBoard events, logs."""

    job_id: str
    prefix: str = Field(description="`s3://` prefix of the job's artifacts.")
    expires_in_s: int = Field(description="Seconds the URLs stay valid (`ARTIFACT_URL_EXPIRY_S`).")
    expires_at: float = Field(description="When the URLs expire (seconds since the epoch).")
    files: list[ArtifactFile]


class OwnerStorage(BaseModel):
    """``GET /storage``: the bytes an owner's jobs hold in S3 (checkpoints, TensorBoard events, logs)."""

    owner: str
    bytes: int = Field(description="Total size of the objects under the jobs' prefixes counted, in bytes.")
    objects: int = Field(description="Objects counted.")
    jobs: int = Field(description="Jobs whose prefixes were listed: the owner's newest, at most `jobs_total`.")
    jobs_total: int = Field(description="Jobs the owner has; more than `jobs` when the listing was bounded (then "
                            "`bytes` leaves the oldest out).")


class WorkerList(BaseModel):
    """The workers that reported within the last three heartbeat intervals."""

    data: list[WorkerStatus]


class OwnerShare(BaseModel):
    """One owner on a queue: its jobs, its fair share and what it used (``shared.scheduler``)."""

    owner: str
    pending: int = Field(description="Its jobs waiting on this queue (queued, retrying, preempted).")
    running: int = Field(description="Its jobs running on this queue, or sent to a worker.")
    share: float = Field(description="Its weight (`FAIR_SHARE_WEIGHTS`) over the weights of the owners listed, 0..1.")
    usage_gpu_s: float = Field(description="GPU-seconds it used on any queue, decayed by `FAIR_SHARE_HALF_LIFE_S`.")


class QueueInfo(BaseModel):
    """One Celery queue: messages waiting and live workers consuming it."""

    name: str
    depth: int = Field(description="Jobs waiting on the queue: pending (queued, retrying, preempted) or sent to a worker and "
                       "not yet taken.")
    workers: int = Field(description="Live workers that consume this queue; 0 means its jobs wait.")


class QueueShares(BaseModel):
    """The owners with jobs pending or running on one queue."""

    queue: str
    owners: list[OwnerShare]


class SharesList(BaseModel):
    """``GET /queues/shares``: per queue, each owner's jobs, fair share and usage (yours only, unless you are an admin)."""

    data: list[QueueShares]


class QueueList(BaseModel):
    """Every queue a job was submitted to or a worker consumes, and the default queue."""

    data: list[QueueInfo]


class Readiness(BaseModel):
    """``/readyz``: whether the API can serve, and how many workers are alive."""

    status: Literal["ready", "unavailable"]
    redis: Literal["ok", "unavailable"]
    s3: Literal["ok", "unavailable"]
    workers: int | None = Field(None, description="Live workers (null while Redis is unavailable).")


class TensorBoardConfig(BaseModel):
    """Where TensorBoard finds the jobs' event files. Never credentials: those are the reader's own."""

    logdir: str = Field(description="`s3://<bucket>/<prefix>/`: every job's run, `<job_id>/tensorboard`.")
    s3_endpoint: str | None = Field(None, description="For TensorBoard's `S3_ENDPOINT`; null means AWS S3.")
    region: str | None = Field(None, description="For `AWS_REGION`.")


class MemoryEstimate(BaseModel):
    """Bytes a job is estimated to need on its device while training, and the budget it must fit.

    ``total_bytes`` = parameters and buffers + gradients + optimizer state + activations (the
    tensors autograd saves for backward in one forward pass of ``batch_size`` samples).
    """

    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int
    budget_bytes: int | None = Field(description="`MAX_JOB_MEMORY_BYTES` or the device's default; null when none applied.")


class DryRunReport(BaseModel):
    """What ``POST /jobs?dry_run=true`` found: the data as listed in S3, the model, one batch."""

    task: str
    classes: list[str] = Field(description="Class names in label-index order (empty for regression).")
    counts: dict[str, int] = Field(
        description="Training samples per class, every class listed (0 included), or rows (`rows`) for regression."
    )
    val_counts: dict[str, int] = Field(
        default_factory=dict, description="Validation samples per class, every class listed (0 included), or rows (`rows`)."
    )
    input_shape: list[int] = Field(description="Shape of one input, e.g. [3, 224, 224] or [10].")
    num_outputs: int
    parameters: int = Field(description="Trainable parameters of the model.")
    num_val: int = Field(0, description="Validation samples.")
    steps_per_epoch: int = Field(0, description="Optimizer steps per epoch.")
    batch_shape: list[int] = Field(description="Shape of the epoch's first batch, which took one training step.")
    last_batch_size: int = Field(0, description="Samples in the epoch's last batch (also run forward and backward).")
    loss: float = Field(description="Loss of the first batch (random weights unless `model.weights_uri`).")
    memory: MemoryEstimate | None = Field(None, description="Memory the job is estimated to need, and the budget.")
    warnings: list[str] = Field(default_factory=list, description="What may surprise you, though the job would run.")
    seconds: float = Field(description="Time the dry run took.")
class TokenCreate(BaseModel):
    """``POST /tokens``: whom a new token acts as."""

    model_config = {"extra": "forbid"}

    owner: str = Field(min_length=1, max_length=64, description="Who the token acts as (letters, digits, `_ . @ -`).")
    admin: bool = Field(False, description="Sees and cancels every owner's jobs; issues tokens.")


class TokenPublic(BaseModel):
    """A stored token, without the token: ``id`` is the first 12 hex digits of its SHA-256."""

    id: str
    owner: str
    admin: bool
    created_at: float = Field(description="Seconds since the epoch.")


class TokenIssued(TokenPublic):
    """A token just issued: ``token`` is shown this once (only its hash is kept)."""

    token: str


class TokenList(BaseModel):
    """``GET /tokens`` and ``DELETE /tokens…``: tokens, oldest first."""

    data: list[TokenPublic]
