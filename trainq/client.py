"""Python client of the trainq API (httpx), typed with the API's own pydantic models.

    from trainq.client import Client

    client = Client("http://127.0.0.1:8000", token=None)      # or TRAINQ_URL / TRAINQ_TOKEN
    record = client.submit("examples/digits.json").wait()       # a JobRecord once the job is final
    print(record.state, record.progress.val_accuracy)             # succeeded 0.9944
    for line in client.follow_logs(record.id): print(line)

Every failed call raises :class:`TrainqClientError` with one readable line (the API's ``detail``,
or why the API could not be reached). :class:`AsyncClient` has the same calls, awaited.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse
from pydantic import BaseModel, ValidationError

from shared.records import JobRecord, JobsPage, JobState, JobSummary
from shared.schemas import (
    ArtifactList,
    DryRunReport,
    OwnerStorage,
    QueueList,
    Readiness,
    SharesList,
    TensorBoardConfig,
    TokenIssued,
    TokenList,
    TokenPublic,
    WorkerList,
    WorkerStatus,
)
from shared.spec import JobSpec

DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds between polls of a job's record while waiting.
POLL_S = 1.0


class TrainqClientError(Exception):
    """A call failed; ``str()`` is one line saying why. ``status_code`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _detail(response: httpx.Response) -> str:
    """The API's error as one line: ``detail``, or a 422's first errors with their locations."""
    if response.headers.get("content-type", "").startswith("text/html"):
        # Another server on the port (the trainq API never answers HTML): say so, not its page.
        url = response.request.url.copy_with(path="/", query=None) if response.request else "?"
        return (f"{response.status_code} from {url}, which is not a trainq API (it answered with an HTML page): "
                "is TRAINQ_URL (or --url) right?")
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text.strip()[:200] or response.reason_phrase
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": ...}, ...]
        parts = [f"{'.'.join(str(p) for p in error.get('loc', [])[1:]) or error.get('loc', ['?'])[0]}: {error.get('msg')}"
                 for error in detail[:3]]
        more = f" (and {len(detail) - 3} more)" if len(detail) > 3 else ""
        detail = "; ".join(parts) + more
    return f"{response.status_code} {detail}"


def _json_body(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a ``json=`` body encoded as ASCII JSON: a string the API must refuse (a lone
    surrogate, say) reaches it as an escape and gets its 422, instead of failing here to encode."""
    if "json" in kwargs:
        body = json.dumps(kwargs.pop("json"))  # ensure_ascii: every character as an escape
        kwargs["content"] = body.encode("ascii")
        kwargs["headers"] = {**(kwargs.get("headers") or {}), "Content-Type": "application/json"}
    return kwargs


def load_spec(spec: JobSpec | dict[str, Any] | str | Path) -> dict[str, Any]:
    """A spec as the JSON the API takes, from a :class:`JobSpec`, a dict or a JSON file's path.

    Raises:
        TrainqClientError: the file is missing or not JSON (naming the file and line).
    """
    if isinstance(spec, JobSpec):
        return spec.model_dump(mode="json", exclude_unset=True)
    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainqClientError(f"spec file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise TrainqClientError(f"spec file {path} is not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None


@dataclass
class Job:
    """A submitted job: ``record`` as the API answered, and calls on it."""

    client: Client
    record: JobRecord
    replayed: bool = False  # an Idempotency-Key returned an earlier job

    @property
    def id(self) -> str:
        """The job's id."""
        return self.record.id

    def refresh(self) -> JobRecord:
        """Read the record again."""
        self.record = self.client.get(self.id)
        return self.record

    def wait(self, *, timeout_s: float | None = None, on_update: Callable[[JobRecord], None] | None = None) -> JobRecord:
        """Wait until the job is final (succeeded, failed, cancelled); return its record. See :meth:`Client.wait`."""
        self.record = self.client.wait(self.id, timeout_s=timeout_s, on_update=on_update)
        return self.record

    def cancel(self) -> JobRecord:
        """Ask the job to stop (see :meth:`Client.cancel`)."""
        self.record = self.client.cancel(self.id)
        return self.record


def _parse(model: type[BaseModel], response: httpx.Response) -> Any:
    try:
        return model.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise TrainqClientError(f"unexpected answer from the API ({type(exc).__name__}); is the URL a trainq API?") from None


class Client:
    """A synchronous client of one trainq API.

    Args:
        url: the API's base URL; default ``TRAINQ_URL`` or ``http://127.0.0.1:8000``.
        token: a bearer token; default ``TRAINQ_TOKEN`` (none: the API must run without auth).
        timeout_s: seconds per HTTP request.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0) -> None:
        self.url = (url or os.environ.get("TRAINQ_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("TRAINQ_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call; raises :class:`TrainqClientError` unless the answer is 2xx."""
        try:
            response = self.http.request(method, path, **_json_body(kwargs))
        except httpx.TimeoutException:
            raise TrainqClientError(f"the trainq API at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise TrainqClientError(f"cannot reach the trainq API at {self.url} ({type(exc).__name__}); is it running (`trainq up`)?") from None
        if response.is_error:
            raise TrainqClientError(_detail(response), response.status_code)
        return response

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict[str, Any] | str | Path, *, idempotency_key: str | None = None) -> Job:
        """Submit a spec (a :class:`JobSpec`, a dict, or a JSON file's path); return the queued :class:`Job`.

        Raises:
            TrainqClientError: the spec is refused (422 naming the field), over quota (429), …
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.request("POST", "/jobs", json=load_spec(spec), headers=headers)
        return Job(self, _parse(JobRecord, response), replayed=response.headers.get("idempotent-replayed") == "true")

    def dry_run(self, spec: JobSpec | dict[str, Any] | str | Path) -> DryRunReport:
        """Check ``spec`` on a worker as the job's own preparation would (data, model, weights,
        memory, one training step on the first and last batches); nothing is queued.

        Raises:
            TrainqClientError: what the job would fail on (422 naming the field), no worker for
                dry runs answered in time (504), …
        """
        return _parse(DryRunReport, self.request("POST", "/jobs", params={"dry_run": "true"}, json=load_spec(spec)))

    def get(self, job_id: str) -> JobRecord:
        """The whole record of ``job_id``."""
        return _parse(JobRecord, self.request("GET", f"/jobs/{job_id}"))

    def job(self, job_id: str) -> Job:
        """A :class:`Job` handle on an existing job."""
        return Job(self, self.get(job_id))

    def list(
        self, *, state: JobState | str | None = None, queue: str | None = None, name: str | None = None,
        owner: str | None = None, limit: int = 20, cursor: str | None = None,
    ) -> JobsPage:
        """One page of job summaries, newest first (follow ``next_cursor``; or use :meth:`iter_jobs`)."""
        params = {"state": JobState(state).value if state else None, "queue": queue, "name": name, "owner": owner,
                  "limit": limit, "cursor": cursor}
        return _parse(JobsPage, self.request("GET", "/jobs", params={k: v for k, v in params.items() if v is not None}))

    def iter_jobs(self, *, max_jobs: int | None = None, **filters: Any) -> Iterator[JobSummary]:
        """Every job matching ``filters`` (as :meth:`list`), page after page, up to ``max_jobs``."""
        cursor, seen = None, 0
        while True:
            page = self.list(cursor=cursor, **filters)
            for summary in page.data:
                if max_jobs is not None and seen >= max_jobs:
                    return
                seen += 1
                yield summary
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel ``job_id``: a queued job never starts, a running one checkpoints and stops (409 if finished)."""
        return _parse(JobRecord, self.request("POST", f"/jobs/{job_id}/cancel"))

    def wait(
        self, job_id: str, *, timeout_s: float | None = None, poll_s: float = POLL_S,
        on_update: Callable[[JobRecord], None] | None = None,
    ) -> JobRecord:
        """Poll ``job_id`` until it is final; return the record. ``on_update`` gets every record read.

        Raises:
            TrainqClientError: the API failed, or ``timeout_s`` passed (the job goes on).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self.get(job_id)
            if on_update is not None:
                on_update(record)
            if record.state.is_final:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TrainqClientError(f"job {job_id} is still {record.state.value} after {timeout_s:g} s")
            time.sleep(poll_s)

    # -- logs and artifacts -----------------------------------------------------------------
    def logs(self, job_id: str, *, attempt: int | None = None) -> str:
        """The job's log so far (every attempt, or one)."""
        params = {"attempt": attempt} if attempt is not None else {}
        return self.request("GET", f"/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str, *, attempt: int | None = None, on_end: Callable[[dict], None] | None = None) -> Iterator[str]:
        """The job's log lines as they are written, until the job ends (server-sent events).

        ``on_end`` gets ``{"state": …, "error": …}`` when the stream ends.
        """
        params = {"follow": "true"} | ({"attempt": attempt} if attempt is not None else {})
        try:
            with connect_sse(self.http, "GET", f"/jobs/{job_id}/logs", params=params, timeout=httpx.Timeout(30, read=None)) as source:
                if source.response.is_error:
                    source.response.read()
                    raise TrainqClientError(_detail(source.response), source.response.status_code)
                for event in source.iter_sse():
                    if event.event == "log":
                        yield from event.data.split("\n")
                    elif event.event == "end":
                        if on_end is not None:
                            on_end(json.loads(event.data))
                        return
        except httpx.TransportError as exc:
            raise TrainqClientError(f"log stream from {self.url} broke off ({type(exc).__name__})") from None

    def artifacts(self, job_id: str) -> ArtifactList:
        """Every object the job wrote, with presigned URLs."""
        return _parse(ArtifactList, self.request("GET", f"/jobs/{job_id}/artifacts"))

    def download_artifacts(self, job_id: str, dest: str | Path, *, on_file: Callable[[Path, int], None] | None = None) -> list[Path]:
        """Download every artifact of ``job_id`` to ``dest/<job_id>/<path>`` (through the presigned
        URLs; no S3 credentials needed), as ``trainq artifacts ID --download DEST`` does, so two jobs'
        files never mix; return the files. ``<job_id>`` is the whole id also when ``job_id`` is a
        prefix. ``on_file(path, size_bytes)`` after each.

        Raises:
            TrainqClientError: a download failed, ``dest`` cannot be written, or a path would leave ``dest/<job_id>``.
        """
        listing = self.artifacts(job_id)
        if not listing.job_id or Path(listing.job_id).name != listing.job_id or listing.job_id in (".", ".."):
            raise TrainqClientError(f"unexpected job id {listing.job_id!r} in the API's answer")
        root = Path(dest).resolve() / listing.job_id
        paths = []
        with httpx.Client(timeout=httpx.Timeout(30, read=300)) as plain:  # no bearer token to S3
            for item in listing.files:
                target = (root / item.path).resolve()
                if not target.is_relative_to(root):
                    raise TrainqClientError(f"artifact path {item.path!r} leaves {root}")
                tmp = target.with_name(target.name + ".part")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with plain.stream("GET", item.url) as response:
                        if response.is_error:
                            raise TrainqClientError(f"download of {item.uri} failed: HTTP {response.status_code}")
                        with open(tmp, "wb") as out:
                            for chunk in response.iter_bytes(1 << 20):
                                out.write(chunk)
                    tmp.replace(target)
                except httpx.TransportError as exc:
                    tmp.unlink(missing_ok=True)
                    raise TrainqClientError(f"download of {item.uri} failed ({type(exc).__name__})") from None
                except OSError as exc:  # the folder given cannot be written (missing parent, a file, no permission, full)
                    raise TrainqClientError(f"cannot write {target}: {exc.strerror or exc}") from None
                paths.append(target)
                if on_file is not None:
                    on_file(target, item.size_bytes)
        return paths

    # -- the service ------------------------------------------------------------------------
    def workers(self) -> list[WorkerStatus]:
        """Live workers."""
        return _parse(WorkerList, self.request("GET", "/workers")).data

    def queues(self) -> QueueList:
        """Queues with their depth and consumers."""
        return _parse(QueueList, self.request("GET", "/queues"))

    def shares(self) -> SharesList:
        """Per queue, each owner's jobs, fair share and decayed usage (``GET /queues/shares``)."""
        return _parse(SharesList, self.request("GET", "/queues/shares"))

    def storage(self, owner: str | None = None) -> OwnerStorage:
        """Bytes an owner's jobs hold in S3 (``GET /storage``): yours, or ``owner``'s (admins)."""
        return _parse(OwnerStorage, self.request("GET", "/storage", params={"owner": owner} if owner else None))

    def ready(self) -> Readiness:
        """``/readyz``, also when it is 503."""
        try:
            return _parse(Readiness, self.http.get("/readyz"))
        except httpx.TransportError as exc:
            raise TrainqClientError(f"cannot reach the trainq API at {self.url} ({type(exc).__name__})") from None

    def tensorboard_config(self) -> TensorBoardConfig:
        """Where the TensorBoard event files are (no credentials)."""
        return _parse(TensorBoardConfig, self.request("GET", "/config/tensorboard"))

    # -- tokens (admins) --------------------------------------------------------------------
    def create_token(self, owner: str, *, admin: bool = False) -> TokenIssued:
        """Issue a token for ``owner`` (its ``token`` is shown this once). Needs an admin token.

        Raises:
            TrainqClientError: 403 not an admin, 422 an invalid owner name.
        """
        return _parse(TokenIssued, self.request("POST", "/tokens", json={"owner": owner, "admin": admin}))

    def tokens(self) -> list[TokenPublic]:
        """Every token (never the token itself), oldest first. Needs an admin token."""
        return _parse(TokenList, self.request("GET", "/tokens")).data

    def revoke_tokens(self, *, token_id: str | None = None, owner: str | None = None) -> list[TokenPublic]:
        """Revoke the token ``token_id`` (≥ 8 hex digits of its id) or every token of ``owner``; return them.

        Raises:
            TrainqClientError: 404 nothing matched, 422 neither or both given, 403 not an admin.
        """
        params = {k: v for k, v in {"id": token_id, "owner": owner}.items() if v is not None}
        return _parse(TokenList, self.request("DELETE", "/tokens", params=params)).data


class AsyncClient:
    """The asynchronous twin of :class:`Client` (``await client.submit(spec)``, ``await client.wait(id)``…)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0) -> None:
        self.url = (url or os.environ.get("TRAINQ_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("TRAINQ_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s)

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call; raises :class:`TrainqClientError` unless the answer is 2xx."""
        try:
            response = await self.http.request(method, path, **_json_body(kwargs))
        except httpx.TransportError as exc:
            raise TrainqClientError(f"cannot reach the trainq API at {self.url} ({type(exc).__name__})") from None
        if response.is_error:
            raise TrainqClientError(_detail(response), response.status_code)
        return response

    async def submit(self, spec: JobSpec | dict[str, Any] | str | Path, *, idempotency_key: str | None = None) -> JobRecord:
        """Submit a spec; return the queued record."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _parse(JobRecord, await self.request("POST", "/jobs", json=load_spec(spec), headers=headers))

    async def get(self, job_id: str) -> JobRecord:
        """The whole record of ``job_id``."""
        return _parse(JobRecord, await self.request("GET", f"/jobs/{job_id}"))

    async def list(self, **filters: Any) -> JobsPage:
        """One page of summaries (``state``, ``queue``, ``name``, ``owner``, ``limit``, ``cursor``)."""
        params = {k: (v.value if isinstance(v, JobState) else v) for k, v in filters.items() if v is not None}
        return _parse(JobsPage, await self.request("GET", "/jobs", params=params))

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel ``job_id``."""
        return _parse(JobRecord, await self.request("POST", f"/jobs/{job_id}/cancel"))

    async def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = POLL_S) -> JobRecord:
        """Poll until ``job_id`` is final; return its record."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = await self.get(job_id)
            if record.state.is_final:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TrainqClientError(f"job {job_id} is still {record.state.value} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    async def follow_logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's log lines as they are written, until the job ends."""
        async with aconnect_sse(self.http, "GET", f"/jobs/{job_id}/logs", params={"follow": "true"},
                                timeout=httpx.Timeout(30, read=None)) as source:
            if source.response.is_error:
                await source.response.aread()
                raise TrainqClientError(_detail(source.response), source.response.status_code)
            async for event in source.aiter_sse():
                if event.event == "log":
                    for line in event.data.split("\n"):
                        yield line
                elif event.event == "end":
                    return
