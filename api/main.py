"""The trainq HTTP API (FastAPI). Run with ``uvicorn api.main:app``; OpenAPI docs at ``/docs``."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.deps import StoreDep
from api.routes import jobs
from shared.jobs import JobStore
from shared.queue import make_celery
from shared.settings import Settings, get_settings
from shared.spec import json_path


MAX_BODY_BYTES = 1024 * 1024
_MAX_ECHO_CHARS = 200


def _finite(value: Any) -> Any:
    """Replace NaN/±Infinity (not valid JSON) with their names, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
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
    NaN or Infinity (fastapi/fastapi#4589); here such values are echoed as strings.
    """
    errors = [_short_input(error) for error in _finite(jsonable_encoder(exc.errors()))]
    for error in errors:
        if error["loc"] and error["loc"][0] == "body":
            error["loc"] = ["body", *json_path(error["loc"][1:], exc.body)]
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": errors})


async def redis_unavailable(request: Request, exc: redis.ConnectionError | redis.TimeoutError) -> JSONResponse:
    """503 with a clear message while Redis cannot be reached, instead of a stack trace."""
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": f"job store (Redis) unavailable: {type(exc).__name__}: {exc}"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API app on ``settings`` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = JobStore.from_url(settings.redis_url)
        app.state.celery = make_celery(settings)
        yield
        app.state.store.redis.close()

    app = FastAPI(
        title="trainq",
        summary="Self-hosted batch training: POST a PyTorch training spec, get checkpoints and TensorBoard logs in S3.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(redis.ConnectionError, redis_unavailable)
    app.add_exception_handler(redis.TimeoutError, redis_unavailable)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        """413 for bodies over 1 MiB (a spec is a few KB), before anything reads them."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                content={"detail": f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}"},
            )
        return await call_next(request)
    app.include_router(jobs.router)

    @app.get("/healthz", tags=["health"])
    def healthz(store: StoreDep) -> dict[str, str]:
        """`{"status": "ok"}` when the API can reach Redis (503 otherwise)."""
        store.redis.ping()
        return {"status": "ok"}

    return app


app = create_app()
