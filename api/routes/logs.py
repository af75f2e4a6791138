"""``GET /jobs/{id}/logs``: each attempt's training log, whole or followed live (server-sent events).

The worker uploads an attempt's log to ``<prefix>/<job_id>/logs/attempt-<N>.log`` while it runs
and marks the last upload complete (:mod:`worker.joblog`); this route reads those objects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio
from botocore.exceptions import ClientError
from fastapi import APIRouter, Depends, Header, HTTPException, Query, status
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import SettingsDep, StorageDep, StoreDep, VisibleJobDep, bearer, token_principal
from shared.joblogs import COMPLETE_METADATA, log_uri
from shared.jobs import JobStore
from shared.numbers import parse_int
from shared.records import JobRecord
from shared.schemas import ErrorDetail
from shared.settings import Settings
from shared.storage import Storage, parse_s3_uri

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["logs"])

#: Seconds between looks at the log object while following.
POLL_S = 1.0
#: Seconds to wait, once the job is final, for its last attempt's log to be marked complete.
FINAL_GRACE_S = 20.0
#: Seconds between checks, while following, that the request's token is still valid: revoking it
#: ends its open streams within this (they went on until the job ended, for days; issue 17).
REAUTH_S = 5.0


class LogsQuery(BaseModel):
    """Query of ``GET /jobs/{id}/logs``; other parameters are refused (422)."""

    model_config = ConfigDict(extra="forbid")

    follow: bool = Field(False, description="Stream the log as server-sent events until the job ends.")
    attempt: int | None = Field(None, ge=1, le=10_000, description="Only this attempt (default: every attempt, in order).")


def _head(storage: Storage, uri: str) -> tuple[int, bool] | None:
    """``(size in bytes, complete)`` of a log object, or None when there is none (yet)."""
    bucket, key = parse_s3_uri(uri)
    try:
        head = storage.client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise
    return head["ContentLength"], head.get("Metadata", {}).get(COMPLETE_METADATA) == "true"


def _read(storage: Storage, uri: str, start: int) -> bytes:
    bucket, key = parse_s3_uri(uri)
    return storage.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-")["Body"].read()


def _whole_logs(storage: Storage, uris: list[str]) -> Iterator[bytes]:
    for uri in uris:
        bucket, key = parse_s3_uri(uri)
        try:
            body = storage.client.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                continue  # an attempt that died before its first upload
            raise
        yield from body.iter_chunks(64 * 1024)


def _resume_point(last_event_id: str | None) -> tuple[int, int] | None:
    """``(attempt, byte offset)`` of an event id this route sent (``"<attempt>:<offset>"``); None for
    anything else (the stream then starts at the beginning)."""
    try:
        attempt, offset = (last_event_id or "").split(":")
        return parse_int(attempt, low=1), parse_int(offset)
    except ValueError:  # not two parts, or not strict numbers ("²".isdigit() was a 500)
        return None


@router.get(
    "/{job_id}/logs",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/plain": {}, "text/event-stream": {}},
            "description": "The log as text; with `follow=true` server-sent events: `log` (lines; `id` is "
            "`<attempt>:<byte offset>`, send it back as `Last-Event-ID` to resume) and a last `end` "
            "(`{\"state\", \"error\"}`).",
        },
        404: {"model": ErrorDetail, "description": "No such job (or another owner's), or no log for that attempt."},
    },
)
def read_logs(
    job: VisibleJobDep,
    query: Annotated[LogsQuery, Query()],
    storage: StorageDep,
    store: StoreDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    last_event_id: Annotated[str | None, Header(max_length=64, include_in_schema=False)] = None,
):
    """The job's training log: each attempt's engine lines, warnings and tracebacks, oldest first.

    With `follow=true`, server-sent events that go on until the job ends."""
    if query.follow:
        attempt, offset = _resume_point(last_event_id) or (query.attempt or 1, 0)
        token = credentials.credentials if credentials is not None else None
        events = _follow(job, storage, store, attempt, offset, only=query.attempt is not None, token=token, settings=settings)
        return EventSourceResponse(events, ping=15)
    if query.attempt is not None:
        uri = log_uri(storage, job.id, query.attempt)
        if _head(storage, uri) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no log for attempt {query.attempt}")
        uris = [uri]
    else:
        uris = [log_uri(storage, job.id, n) for n in range(1, job.attempts + 1)]
    return StreamingResponse(_whole_logs(storage, uris), media_type="text/plain; charset=utf-8")


async def _follow(
    job: JobRecord, storage: Storage, store: JobStore, attempt: int, offset: int, *, only: bool,
    token: str | None = None, settings: Settings | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """Events with new whole lines of the log as they are uploaded, attempt after attempt, then ``end``.

    With ``token`` (the request's bearer token), every :data:`REAUTH_S` seconds the token must still
    let its owner see the job; when it no longer does (revoked), an ``end`` event says so and the
    stream stops."""
    waiting_since: float | None = None  # since when this attempt is over, its log not yet marked complete
    checked_at = anyio.current_time()
    while True:
        record = await anyio.to_thread.run_sync(store.get, job.id)
        if token is not None and settings is not None and anyio.current_time() - checked_at >= REAUTH_S:
            principal = await token_principal(token, store, settings)
            if principal is None or not principal.can_see(job.owner):
                error = "the bearer token was revoked; the stream ended"
                yield ServerSentEvent(data=json.dumps({"state": record.state.value, "error": error}), event="end")
                return
            checked_at = anyio.current_time()
        uri = log_uri(storage, job.id, attempt)
        head = await anyio.to_thread.run_sync(_head, storage, uri)
        if head is not None and head[0] > offset:
            data = await anyio.to_thread.run_sync(_read, storage, uri, offset)
            whole = data[: data.rfind(b"\n") + 1]  # only whole lines; the rest comes with the next upload
            if whole:
                offset += len(whole)
                yield ServerSentEvent(data=whole.decode("utf-8", "replace").rstrip("\n"), event="log", id=f"{attempt}:{offset}")
                continue
        if record.attempts > attempt or record.state.is_final:  # this attempt is over
            now = anyio.current_time()
            waiting_since = now if waiting_since is None else waiting_since
            never_ran = record.attempts < attempt
            if never_ran or (head is not None and head[1]) or now - waiting_since > FINAL_GRACE_S:
                if record.attempts > attempt and not only:
                    attempt, offset, waiting_since = attempt + 1, 0, None
                    continue
                yield ServerSentEvent(data=json.dumps({"state": record.state.value, "error": record.error}), event="end")
                return
        await anyio.sleep(POLL_S)
