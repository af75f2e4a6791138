"""``/jobs``: submit a training spec, read one job, list jobs newest first, cancel a job."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from pydantic import BaseModel

from api.deps import CeleryDep, SettingsDep, StoreDep
from shared.exceptions import IdempotencyConflictError, InvalidTransitionError, JobNotFoundError
from shared.jobs import JobRecord, JobState
from shared.queue import enqueue
from shared.spec import JobSpec

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobsPublic(BaseModel):
    """A page of jobs, newest first, and the total number of jobs."""

    data: list[JobRecord]
    count: int
    limit: int
    offset: int


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobRecord)
def create_job(
    spec: JobSpec,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="Retries with the same key (24 h) return the same job, never a second one."),
    ] = None,
) -> JobRecord:
    """Validate a training spec, record the job as `queued` and enqueue it. 202 with the job."""
    queue = spec.queue or settings.default_queue
    try:
        record, created = store.create(spec, queue, idempotency_key=idempotency_key)
    except IdempotencyConflictError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    response.headers["Location"] = f"/jobs/{record.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        return record
    try:
        enqueue(celery, record.id, queue)
    except Exception as exc:
        # Never leave a job recorded as queued that no worker will ever see.
        logger.exception("job %s: enqueue failed", record.id)
        store.transition(record.id, JobState.FAILED, reason="enqueue failed", error=f"could not enqueue: {exc}")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"queue unavailable: {exc}") from exc
    return record


@router.get("/{job_id}", response_model=JobRecord)
def read_job(job_id: str, store: StoreDep) -> JobRecord:
    """One job: state, timestamps, progress, device, error and artifact URIs."""
    try:
        return store.get(job_id)
    except JobNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


@router.get("", response_model=JobsPublic)
def read_jobs(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    offset: Annotated[int, Query(ge=0, le=10**12)] = 0,
) -> JobsPublic:
    """Jobs newest first, `limit` per page from `offset`."""
    records, count = store.list(limit=limit, offset=offset)
    return JobsPublic(data=records, count=count, limit=limit, offset=offset)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobRecord)
def cancel_job(job_id: str, store: StoreDep) -> JobRecord:
    """Cancel a job. Queued: it never starts. Running: it stops at the next step, saves a
    checkpoint and its TensorBoard events, and ends `cancelled` within seconds. Finished: 409."""
    try:
        return store.request_cancel(job_id)
    except JobNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except InvalidTransitionError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is already {exc.current}; nothing to cancel") from exc
