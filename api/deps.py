"""FastAPI dependencies: the job store, S3, the Celery app, the settings, who is asking, and the job asked about."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.auth import ANONYMOUS_OWNER, Principal, authenticate_async
from shared.exceptions import JobNotFoundError
from shared.jobs import JobRecord, JobStore
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
    description="A token from `python -m trainq.admin token create --owner <name>`, sent as "
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


def get_visible_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> JobRecord:
    """The record of ``job_id`` if the caller may see it; 404 otherwise (also for another owner's job,
    so ids do not leak)."""
    try:
        record = store.get(job_id)
    except JobNotFoundError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    if not principal.can_see(record.owner):
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(JobNotFoundError(job_id)))
    return record


VisibleJobDep = Annotated[JobRecord, Depends(get_visible_job)]
