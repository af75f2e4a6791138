"""``/jobs``: submit a training spec, read one job, list jobs newest first."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel

from api.deps import CeleryDep, SettingsDep, StoreDep
from shared.exceptions import JobNotFoundError
from shared.jobs import JobRecord, JobState
from shared.queue import TRAIN_TASK
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
def create_job(spec: JobSpec, store: StoreDep, celery: CeleryDep, settings: SettingsDep, response: Response) -> JobRecord:
    """Validate a training spec, record the job as `queued` and enqueue it. 202 with the job."""
    queue = spec.queue or settings.default_queue
    record = store.create(spec, queue)
    try:
        celery.send_task(TRAIN_TASK, args=[record.id], queue=queue)
    except Exception as exc:
        # Never leave a job recorded as queued that no worker will ever see.
        logger.exception("job %s: enqueue failed", record.id)
        store.transition(record.id, JobState.FAILED, error=f"could not enqueue: {exc}")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"queue unavailable: {exc}") from exc
    response.headers["Location"] = f"/jobs/{record.id}"
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
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobsPublic:
    """Jobs newest first, `limit` per page from `offset`."""
    records, count = store.list(limit=limit, offset=offset)
    return JobsPublic(data=records, count=count, limit=limit, offset=offset)
