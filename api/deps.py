"""FastAPI dependencies: the job store, S3, the Celery app, the settings, who is asking, and the job asked about."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.auth import Principal, authenticate_async
from shared.exceptions import JobNotFoundError
from shared.jobs import JobStore
from shared.records import ANONYMOUS_OWNER, JobRecord
from shared.settings import Settings
from shared.storage import Storage


async def get_store(request: Request) -> JobStore:
    """The process's :class:`JobStore` (set up by the app's lifespan)."""
    return request.app.state.store


async def get_celery(request: Request) -> Celery:
    """The process's Celery app, used only to send tasks."""
    return request.app.state.celery


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    """The process's S3 :class:`Storage` (logs, artifacts, readiness)."""
    return request.app.state.storage


StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

bearer = HTTPBearer(
    auto_error=False,
    description="A token from `trainq token create --owner <name>` (an admin's `POST /tokens`), sent as "
    "`Authorization: Bearer <token>`. Required when the server runs with `AUTH_REQUIRED=true`.",
)


def is_loopback(host: str | None) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and ``localhost``; False for anything else (or unknown)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    store: StoreDep,
    settings: SettingsDep,
) -> Principal:
    """Who the request acts as: the owner of its bearer token.

    Without a token: 401 when ``AUTH_REQUIRED``; otherwise the anonymous owner ``local``, for a
    client on this machine only (a request from elsewhere, also through a reverse proxy that
    sets ``X-Forwarded-For``, is a 403).
    """
    if credentials is not None:
        return await _bearer_principal(request, credentials.credentials, store, settings)
    if settings.auth_required:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token is required: send `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not is_loopback(request.client.host if request.client else None):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this server runs without authentication (AUTH_REQUIRED=false) and serves only clients on its own "
            "machine; set AUTH_REQUIRED=true to serve others",
        )
    return Principal(owner=ANONYMOUS_OWNER)


async def token_principal(token: str, store: JobStore, settings: Settings) -> Principal | None:
    """Who ``token`` acts as now (``ADMIN_TOKEN`` or a stored token); None when unknown or revoked."""
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    return await authenticate_async(token, store.aredis, admin_token)


async def _bearer_principal(request: Request, token: str, store: JobStore, settings: Settings) -> Principal:
    """The principal of ``token``: 429 when its client is over ``AUTH_LOOKUPS_PER_MINUTE`` (before any
    Redis call), 401 when it is malformed (no Redis call either), unknown or revoked."""
    limiter = request.app.state.lookup_limiter
    address = request.client.host if request.client else ""
    wait_s = limiter.admit(address, token)
    if wait_s is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many unknown bearer tokens from this address (AUTH_LOOKUPS_PER_MINUTE); try again later",
            headers={"Retry-After": str(int(wait_s))},
        )
    principal = await token_principal(token, store, settings)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked bearer token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    limiter.authenticated(address, token)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


#: A job id is 32 hex digits; a unique prefix of at least this many stands for it (as git's short ids).
MIN_ID_PREFIX = 6
_JOB_ID_CHARS = 32
#: Matches an ambiguous prefix's error lists.
_SHOWN_MATCHES = 5


def resolve_job_id(job_id: str, store: JobStore, principal: Principal) -> str:
    """The whole id that ``job_id`` stands for: itself, or the one job among those ``principal``
    sees whose id starts with it (``MIN_ID_PREFIX``–31 hex digits, any case).

    Raises:
        JobNotFoundError: a prefix no visible job has.
        HTTPException: 404 for a hex prefix shorter than ``MIN_ID_PREFIX`` (saying so).
        HTTPException: 422 naming ``job_id`` when several visible jobs have the prefix (listing them).
    """
    prefix = job_id.lower()
    if prefix and len(prefix) < MIN_ID_PREFIX and not prefix.strip("0123456789abcdef"):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"job {job_id!r} not found: a short id needs at least {MIN_ID_PREFIX} hex digits"
        )
    if not MIN_ID_PREFIX <= len(prefix) < _JOB_ID_CHARS or prefix.strip("0123456789abcdef"):
        return job_id
    # Only the caller's own jobs (an admin's: everyone's), so a prefix reveals no other owner's ids.
    matches = store.ids_starting_with(prefix, owner=None if principal.admin else principal.owner, limit=_SHOWN_MATCHES + 1)
    if not matches:
        raise JobNotFoundError(job_id)
    if len(matches) > 1:
        shown = ", ".join(matches[:_SHOWN_MATCHES]) + (", …" if len(matches) > _SHOWN_MATCHES else "")
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": ["path", "job_id"], "type": "ambiguous_id", "input": job_id,
              "msg": f"job id prefix {job_id!r} matches {'more than ' if len(matches) > _SHOWN_MATCHES else ''}"
                     f"{min(len(matches), _SHOWN_MATCHES)} jobs ({shown}); give more characters"}],
        )
    return matches[0]


def get_visible_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> JobRecord:
    """The record of ``job_id`` (or of the one job whose id starts with it, see :func:`resolve_job_id`)
    if the caller may see it; 404 otherwise (also for another owner's job, so ids do not leak)."""
    try:
        record = store.get(resolve_job_id(job_id, store, principal))
    except JobNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    if not principal.can_see(record.owner):
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(JobNotFoundError(job_id)))
    return record


VisibleJobDep = Annotated[JobRecord, Depends(get_visible_job)]
