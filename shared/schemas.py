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


class QueueInfo(BaseModel):
    """One Celery queue: messages waiting and live workers consuming it."""

    name: str
    depth: int = Field(description="Jobs waiting on the queue: pending (queued, retrying, preempted) or sent to a worker and "
                       "not yet taken.")
    workers: int = Field(description="Live workers that consume this queue; 0 means its jobs wait.")


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
