"""``/healthz`` (the process is up) and ``/readyz`` (Redis and S3 answer; how many workers live).

Neither needs a token (probes have none); neither names an internal address.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response, status

from shared.schemas import Readiness
from shared.workers import live_workers

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """`{"status": "ok"}` while the process serves requests (no dependency checked: a liveness probe).

    Async: it never waits for the threadpool, so a busy pool cannot fail the liveness probe."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Redis or S3 unreachable."}})
def readyz(request: Request, response: Response) -> Readiness:
    """Ready when Redis answers a ping and the bucket a HEAD; also counts the live workers. 503 otherwise."""
    store, probe = request.app.state.store, request.app.state.s3_probe
    redis_ok = s3_ok = False
    workers = None
    try:
        store.redis.ping()
        workers = len(live_workers(store.redis))
        redis_ok = True
    except Exception as exc:
        logger.warning("readyz: Redis: %s: %s", type(exc).__name__, exc)
    try:
        probe.client.head_bucket(Bucket=probe.bucket)
        s3_ok = True
    except Exception as exc:
        logger.warning("readyz: S3: %s: %s", type(exc).__name__, exc)
    ready = redis_ok and s3_ok
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(
        status="ready" if ready else "unavailable", redis="ok" if redis_ok else "unavailable",
        s3="ok" if s3_ok else "unavailable", workers=workers,
    )
