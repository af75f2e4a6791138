"""``/jobs``: submit a training spec, read one job, list jobs newest first, cancel a job."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from api.deps import CeleryDep, SettingsDep, StoreDep
from shared.access import spec_access_problems
from shared.exceptions import IdempotencyConflictError, InvalidTransitionError, JobNotFoundError
from shared.jobs import DryRunReport, JobRecord, JobState
from shared.queue import enqueue
from shared.settings import Settings
from shared.spec import JobSpec

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobsPublic(BaseModel):
    """A page of jobs, newest first, and the total number of jobs."""

    data: list[JobRecord]
    count: int
    limit: int
    offset: int


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRecord | DryRunReport,
    responses={200: {"model": DryRunReport, "description": "Dry run: what was found; nothing queued."}},
)
def create_job(
    spec: JobSpec,
    store: StoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1, max_length=255, description="Retries with the same key (24 h) return the same job, never a second one."
        ),
    ] = None,
    dry_run: Annotated[
        bool, Query(description="Only check: list the data, build the model, run one batch on the CPU. Queues nothing.")
    ] = False,
) -> JobRecord | DryRunReport:
    """Validate a training spec, record the job as `queued` and enqueue it. 202 with the job.

    With `dry_run=true`: 200 with what the data and model look like, or 422 naming the problem."""
    _check_access(spec, settings)
    if dry_run:
        response.status_code = status.HTTP_200_OK
        return _dry_run(spec, settings)
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


def _check_access(spec: JobSpec, settings: Settings) -> None:
    """422, shaped as a validation error, for each queue or URI the settings do not allow."""
    problems = spec_access_problems(spec, settings)
    if problems:
        errors = [{"type": "value_error", "loc": ("body", *p.loc), "msg": p.message, "input": p.value} for p in problems]
        raise RequestValidationError(errors, body=spec.model_dump(mode="json"))


def _dry_run(spec: JobSpec, settings) -> DryRunReport:
    # Imported here: torch loads only in an API process that serves dry runs.
    from shared.exceptions import JobFailure
    from shared.storage import Storage
    from worker.training.dryrun import dry_run

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return dry_run(spec, Storage(settings), settings.data_cache_dir / "dry-run", settings.data_root)
    except JobFailure as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    except (BotoCoreError, ClientError) as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"S3 unavailable: {exc}") from exc
    except Exception as exc:  # torch refusing the spec's model or data in a way we did not foresee
        logger.exception("dry run failed")
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"dry run failed: {type(exc).__name__}: {exc}") from exc


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
