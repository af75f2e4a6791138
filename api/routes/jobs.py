"""``/jobs``: submit a training spec, read one job, list jobs newest first, cancel a job.

Every route acts as the request's owner (:data:`api.deps.PrincipalDep`): an owner sees, lists and
cancels only their own jobs (an admin every owner's); another owner's job is a 404, exactly like a
job that does not exist, so ids do not leak.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated

import anyio
import redis
from celery import Celery
from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CeleryDep, PrincipalDep, SettingsDep, StoreDep, VisibleJobDep
from shared.access import spec_access_problems
from shared.dryruns import request_dry_run
from shared.exceptions import (
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    QuotaExceededError,
)
from shared.jobs import JobStore
from shared.quotas import count_submission
from shared.records import JobRecord, JobsPage, JobState
from shared.scheduler import make_pending
from shared.schemas import DryRunReport, ErrorDetail
from shared.settings import Settings
from shared.spec import QUEUE_PATTERN, JobSpec

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobsQuery(BaseModel):
    """Filters and paging of ``GET /jobs``; any other parameter is refused (422)."""

    model_config = ConfigDict(extra="forbid")

    state: JobState | None = Field(None, description="Only jobs in this state.")
    queue: str | None = Field(None, pattern=QUEUE_PATTERN, description="Only jobs on this queue.")
    name: str | None = Field(None, min_length=1, max_length=128, description="Only jobs whose spec has this `name`.")
    owner: str | None = Field(None, max_length=64, description="Admins: only this owner's jobs. Others see only their own.")
    limit: int = Field(20, ge=1, le=500, description="Jobs per page.")
    cursor: str | None = Field(None, max_length=200, description="`next_cursor` of the previous page.")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRecord | DryRunReport,
    responses={
        200: {"model": DryRunReport, "description": "Dry run: what was found; nothing queued."},
        409: {"model": ErrorDetail, "description": "The `Idempotency-Key` was used with another spec."},
        429: {"description": "Over the owner's quota (jobs queued or running, jobs waiting to start, or submissions per minute); "
             "see `Retry-After`."},
    },
)
async def create_job(
    spec: JobSpec,
    principal: PrincipalDep,
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
        bool,
        Query(
            description="Only check, on a worker: the job's own preparation (data, model, weights, memory) and one "
            "training step on the CPU. Queues no job."
        ),
    ] = False,
) -> JobRecord | DryRunReport:
    """Validate a training spec, record the job as `queued` in its queue's pending set. 202 with the job.

    With `dry_run=true`: 200 with what the data and model look like, or 422 naming the problem."""
    # An async route: FastAPI would run a sync one in its threadpool. Only the pending-set write goes to a
    # thread; the record is one Lua script on redis.asyncio and a dry run waits on it too (issue 17).
    if dry_run:
        response.status_code = status.HTTP_200_OK
        return await _checked_dry_run(spec, settings, store, celery, principal.owner, admin=principal.admin)
    if spec_access_problems(spec, settings, principal.owner, admin=principal.admin):
        await _count_submission(store, principal.owner, settings)  # a refused submission counts too
        _check_access(spec, settings, principal.owner, admin=principal.admin)
    queue = spec.queue or settings.default_queue
    # Shielded: a cancelled request (server shutdown) must not stop between recording and enqueueing.
    with anyio.CancelScope(shield=True):
        try:
            record, created = await store.create_async(
                spec, queue, owner=principal.owner, idempotency_key=idempotency_key,
                max_active=settings.max_active_jobs_per_owner, max_pending=settings.max_pending_jobs_per_owner,
                per_minute=settings.submissions_per_minute,
            )
        except IdempotencyConflictError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        except QuotaExceededError as exc:
            raise _too_many(exc) from exc
        if created:
            await run_in_threadpool(_make_pending, store, record)
    response.headers["Location"] = f"/jobs/{record.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return record


async def _count_submission(store: JobStore, owner: str, settings: Settings) -> None:
    try:
        await count_submission(store.aredis, owner, settings.submissions_per_minute)
    except QuotaExceededError as exc:
        raise _too_many(exc) from exc


async def _checked_dry_run(
    spec: JobSpec, settings: Settings, store: JobStore, celery: Celery, owner: str, *, admin: bool = False
) -> DryRunReport:
    """A dry run counts as a submission and is checked like one (429, then 422), then runs on a worker."""
    await _count_submission(store, owner, settings)
    _check_access(spec, settings, owner, admin=admin)
    return await _dry_run(spec, settings, store, celery, owner)


def _make_pending(store: JobStore, record: JobRecord) -> None:
    """Put the new job in its queue's pending set and wake the dispatcher, which sends it to a worker
    when one is free (:mod:`shared.scheduler`). The job is recorded already: if Redis fails now, the
    dispatcher's sweep lists it within seconds, so the answer stays 202."""
    try:
        make_pending(store.redis, record)
    except redis.RedisError as exc:
        logger.warning("job %s: not listed for dispatch yet (%s); the dispatcher's sweep will", record.id, exc)


def _too_many(exc: QuotaExceededError) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": str(math.ceil(exc.retry_after_s))}
    )


def _check_access(spec: JobSpec, settings: Settings, owner: str, *, admin: bool = False) -> None:
    """422, shaped as a validation error, for each queue or URI the settings do not allow ``owner``."""
    problems = spec_access_problems(spec, settings, owner, admin=admin)
    if problems:
        errors = [{"type": "value_error", "loc": ("body", *p.loc), "msg": p.message, "input": p.value} for p in problems]
        raise RequestValidationError(errors, body=spec.model_dump(mode="json"))


async def _dry_run(spec: JobSpec, settings: Settings, store: JobStore, celery: Celery, owner: str) -> DryRunReport:
    """Run the dry run on a worker (``DRY_RUN_QUEUE``, owners in turn) and wait for it without a
    thread; this process never imports torch."""
    try:
        reply = await request_dry_run(
            celery, store.aredis, spec.model_dump(mode="json"), settings.dry_run_queue, settings.dry_run_timeout_s,
            owner=owner, per_owner=settings.dry_runs_per_owner, overall=settings.dry_runs_max,
        )
    except QuotaExceededError as exc:
        raise _too_many(exc) from exc
    except OperationalError as exc:
        logger.error("dry run: could not enqueue: %s", exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "queue unavailable; try again later") from exc
    if reply is None:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            f"no worker finished the dry run within {settings.dry_run_timeout_s:g} s (DRY_RUN_TIMEOUT_S): workers may be "
            f"busy training, or none consumes the queue {settings.dry_run_queue!r} (start one with -Q default,{settings.dry_run_queue})",
        )
    if "report" in reply:
        return DryRunReport.model_validate(reply["report"])
    if "errors" in reply:  # what would fail the job, shaped as a validation error
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, reply["errors"])
    raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, reply["unavailable"])


@router.get("/{job_id}", response_model=JobRecord, responses={404: {"model": ErrorDetail}})
def read_job(job: VisibleJobDep) -> JobRecord:
    """One job: state, timestamps, progress, device, error and artifact URIs."""
    return job


@router.get("", response_model=JobsPage)
def read_jobs(store: StoreDep, principal: PrincipalDep, query: Annotated[JobsQuery, Query()]) -> JobsPage:
    """Your jobs (an admin: everyone's) newest first, as summaries without the spec, filtered by
    `state`, `queue` and `name`; `limit` per page, then `cursor=<next_cursor>` until it is null.
    `GET /jobs/{id}` has the whole record."""
    owner = query.owner if principal.admin else principal.owner
    if not principal.admin and query.owner not in (None, principal.owner):
        return JobsPage(data=[], count=0)  # another owner's jobs do not exist for you
    try:
        return store.list(
            owner=owner, state=query.state, queue=query.queue, name=query.name, limit=query.limit, cursor=query.cursor
        )
    except ValueError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error", "input": query.cursor}],
        ) from exc


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRecord,
    responses={404: {"model": ErrorDetail}, 409: {"model": ErrorDetail, "description": "The job is already finished."}},
)
def cancel_job(job: VisibleJobDep, store: StoreDep) -> JobRecord:
    """Cancel a job. Queued: it never starts. Running: it stops at the next step, saves a
    checkpoint and its TensorBoard events, and ends `cancelled` within seconds. Finished: 409."""
    try:
        return store.request_cancel(job.id)
    except JobNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except InvalidTransitionError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is already {exc.current}; nothing to cancel") from exc
