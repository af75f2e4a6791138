"""Bodies of the API's answers besides the job record (:mod:`shared.jobs`) and worker status
(:mod:`shared.workers`), shared by the API and the Python client (:mod:`trainq.client`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.workers import WorkerStatus


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
