"""The trainq HTTP API (FastAPI). Run with ``uvicorn api.main:app``; OpenAPI docs at ``/docs``.

The docs pages (Swagger UI at ``/docs``, ReDoc at ``/redoc``) load their JavaScript and CSS from the
API itself (fastapi-offline ships them), so they work on a cluster without internet access.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from api.metrics import instrument
from api.ratelimit import LookupLimiter
from api.routes import artifacts, config, health, jobs, logs, storage, tokens, workers
from api.suggest import did_you_mean, field_names_at
from shared.auth import MIN_ADMIN_TOKEN_CHARS
from shared.jobs import JobStore
from shared.queue import make_celery
from shared.records import ANONYMOUS_OWNER
from shared.scheduler import DISPATCHER_CLIENT_NAME, Dispatcher
from shared.schemas import ErrorDetail
from shared.settings import Settings, get_settings
from shared.spec import json_path
from shared.storage import Storage

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
_MAX_ECHO_CHARS = 200
#: Levels of nesting echoed back in a 422's ``input``; deeper ones are ``"…"``.
MAX_ECHO_DEPTH = 20
#: Errors listed in one 422; the rest are counted (60,000 unknown keys made a 6 MB answer).
MAX_ERRORS = 50


def _echoable(value: Any, depth: int = 0) -> Any:
    """``value`` made safe to echo in a 422: NaN/±Infinity (not valid JSON) as their names, lone
    surrogates (``"\\ud800"``, not UTF-8) as escapes, and nesting past :data:`MAX_ECHO_DEPTH` as
    ``"…"``. Depth-bounded: JSON nested 600 deep made the recursion a 500 (issue 17)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict | list | tuple) and depth >= MAX_ECHO_DEPTH:
        return "…"
    if isinstance(value, dict):
        return {_echoable(key, depth + 1): _echoable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_echoable(item, depth + 1) for item in value]
    return value


def _short_input(error: dict[str, Any]) -> dict[str, Any]:
    """An error whose echoed ``input`` is cut to a readable length (a 20 MB name is not echoed)."""
    text = json.dumps(error.get("input"), default=str)
    if len(text) > _MAX_ECHO_CHARS:
        error = dict(error, input=text[:_MAX_ECHO_CHARS] + f"… ({len(text)} characters)")
    return error


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each error with its JSON path (``loc``), e.g. ``["body", "optimizer", "lr"]``.

    FastAPI's default handler echoes the bad input back and fails with a 500 when that input is
    NaN or Infinity (fastapi/fastapi#4589); here such values are echoed as strings. At most
    ``MAX_ERRORS`` are listed; a last entry of type ``too_many_errors`` counts the rest.
    """
    found = exc.errors()
    errors = [_short_input(error) for error in jsonable_encoder(_echoable(found[:MAX_ERRORS]))]
    route = request.scope.get("route")
    body_field = getattr(route, "body_field", None)
    query_names = set()
    for field in getattr(getattr(route, "dependant", None), "query_params", []):
        query_names |= field_names_at(field.field_info.annotation, []) or {field.alias}  # a model of parameters, or one
    for error in errors:
        if error.get("type") == "extra_forbidden" and error["loc"]:
            # Before the loc loses its union tags: they say which model's names to suggest from.
            where, *loc = error["loc"]
            if where == "body" and body_field is not None and isinstance(body_field.field_info.annotation, type):
                error["msg"] += did_you_mean(body_field.field_info.annotation, loc)
            elif where == "query":
                error["msg"] += did_you_mean(None, loc, query_names)
        if error["loc"] and error["loc"][0] == "body":
            error["loc"] = ["body", *_echoable(json_path(error["loc"][1:], exc.body))]
    if len(found) > MAX_ERRORS:
        errors.append(
            {"loc": ["body"], "msg": f"{len(found) - MAX_ERRORS} more errors not shown ({len(found)} in all)",
             "type": "too_many_errors", "input": None}
        )
    first = errors[0] if errors else {"loc": [], "type": "?"}
    logger.info("%s %s: 422: %d error(s), first %s at %s", request.method, request.url.path, len(found),
                first["type"], ".".join(map(str, first["loc"]))[:200])
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": errors})


async def redis_unavailable(request: Request, exc: redis.ConnectionError | redis.TimeoutError) -> JSONResponse:
    """503 while Redis cannot be reached. The answer does not name Redis's address; the log does."""
    logger.error("%s %s: job store unavailable: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "job store unavailable; try again shortly"},
    )


def _async_redis(settings: Settings) -> redis.asyncio.Redis:
    """The asyncio client of the API's routes, on a pool of ``API_REDIS_CONNECTIONS`` where a request
    *waits* for a free connection (up to ``API_REDIS_WAIT_S``, then 503): a burst beyond the pool is
    served in turn instead of failing everyone (issue 17: 150 random tokens made 10 real ones 503)."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.api_redis_connections, timeout=settings.api_redis_wait_s,
        health_check_interval=30,
    )
    return redis.asyncio.Redis.from_pool(pool)


def _warn_about_auth(settings: Settings) -> None:
    if settings.admin_token is not None and len(settings.admin_token.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
        logger.warning("ADMIN_TOKEN is shorter than %d characters and is ignored", MIN_ADMIN_TOKEN_CHARS)
    if not settings.auth_required:
        logger.warning(
            "authentication is OFF (AUTH_REQUIRED=false): requests without a token act as owner %r and only "
            "clients on this machine (loopback) are served; set AUTH_REQUIRED=true to serve others",
            ANONYMOUS_OWNER,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API app on ``settings`` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        _warn_about_auth(settings)
        app.state.store = JobStore(redis.Redis.from_url(settings.redis_url, health_check_interval=30), _async_redis(settings))
        app.state.lookup_limiter = LookupLimiter(settings.auth_lookups_per_minute)
        app.state.celery = make_celery(settings)
        app.state.storage = Storage(settings)
        # Readiness must answer within a probe's timeout: one try, short timeouts.
        app.state.s3_probe = Storage(settings, max_attempts=1, timeout_s=2)
        app.state.presigner = Storage(settings, endpoint_url=settings.s3_public_endpoint_url)
        # Every API process runs one; the holder of the Redis lease dispatches (shared.scheduler).
        # On connections of its own, named, so a route's Redis work and the dispatcher's stay apart.
        dispatcher_redis = redis.Redis.from_url(settings.redis_url, health_check_interval=30, client_name=DISPATCHER_CLIENT_NAME)
        dispatcher = Dispatcher(JobStore(dispatcher_redis), app.state.celery, settings)
        dispatcher.start()
        yield
        dispatcher.stop()
        dispatcher_redis.close()
        app.state.store.redis.close()
        await app.state.store.aredis.aclose()

    app = FastAPIOffline(
        title="trainq",
        summary="Self-hosted batch training: POST a PyTorch training spec, get checkpoints and TensorBoard logs in S3.",
        version="0.1.0",
        lifespan=lifespan,
        # 413 for bodies over 1 MiB (a spec is a few KB), counted on the bytes read, so a chunked
        # body without Content-Length is limited too.
        max_body_size=MAX_BODY_BYTES,
        responses={503: {"model": ErrorDetail, "description": "Redis (the job store) unavailable; try again."}},
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(redis.ConnectionError, redis_unavailable)
    app.add_exception_handler(redis.TimeoutError, redis_unavailable)

    app.include_router(jobs.router)
    app.include_router(logs.router)
    app.include_router(artifacts.router)
    app.include_router(workers.router)
    app.include_router(storage.router)
    app.include_router(config.router)
    app.include_router(tokens.router)
    app.include_router(health.router)
    instrument(app)
    return app


app = create_app()
