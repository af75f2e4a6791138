"""The Celery task ``trainq.dry_run``: a spec's dry run on a worker, answered over Redis.

The API queues the request in its owner's list and sends a ticket to ``DRY_RUN_QUEUE``
(:func:`shared.dryruns.request_dry_run`); any worker consuming that queue takes a ticket between
jobs and serves the next owner's request in turn (:func:`shared.dryruns.take_next_dry_run`) — the local stack's worker consumes
``default,dry-run``; a deployment may add cheap CPU workers for it. It is acknowledged on
receipt (a dry run that kills its worker is not delivered again) and it stops when the API has
stopped waiting or the worker shuts down.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from shared.exceptions import Interrupted, JobFailure
from shared.access import settings_for_owner
from shared.dryruns import DRY_RUN_TASK, send_dry_run_reply, take_next_dry_run
from shared.sanitize import public_message
from shared.settings import Settings, get_settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.celery_app import app
from worker.heartbeat import worker_shutdown
from worker.training.dryrun import dry_run

logger = logging.getLogger(__name__)


def run_dry_run(spec: dict[str, Any], storage: Storage, settings: Settings, deadline: float) -> dict[str, Any]:
    """Dry-run ``spec`` (JSON) until ``deadline`` (seconds since the epoch); return the reply for the API.

    Returns:
        ``{"report": ...}``; ``{"errors": [{"loc", "msg", "type"}]}`` for what would fail the job
        (the API's 422, shaped as its validation errors); ``{"unavailable": ...}`` when the dry
        run could not be done (storage unreachable, worker shutting down: the API's 503).
    """

    def should_stop() -> str | None:
        if worker_shutdown.is_set():
            return "worker shutdown"
        return "the API stopped waiting" if time.time() > deadline else None

    try:
        report = dry_run(JobSpec.model_validate(spec), storage, settings, should_stop=should_stop)
    except ValidationError as exc:  # the API validated it; a worker on another version may not agree
        errors = [{"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
        return {"errors": errors}
    except JobFailure as exc:
        return {"errors": [exc.as_error()]}
    except Interrupted as exc:
        return {"unavailable": f"the dry run was stopped: {exc.reason}"}
    except (BotoCoreError, ClientError):
        logger.exception("dry run: storage error")
        return {"unavailable": "storage unreachable; try again later"}
    except Exception as exc:
        logger.exception("dry run failed")
        message = f"dry run failed: {public_message(exc)} (the worker's log has the traceback)"
        return {"errors": [{"loc": ["body"], "msg": message, "type": "internal_error"}]}
    return {"report": report.model_dump(mode="json")}


_redis: redis.Redis | None = None
_storage: Storage | None = None


@app.task(name=DRY_RUN_TASK, acks_late=False, ignore_result=True)
def dry_run_task(queue: str) -> None:
    """Celery entry point (task ``trainq.dry_run``, a ticket): serve the next owner's dry run on ``queue``, if any."""
    global _redis, _storage
    settings = get_settings()
    if _redis is None:
        _redis = redis.Redis.from_url(settings.redis_url)
        _storage = Storage(settings)
    request = take_next_dry_run(_redis, queue)
    if request is None:
        return  # every request this ticket could serve was served by another, or given up
    started = time.monotonic()
    reply = run_dry_run(request.spec, _storage, settings_for_owner(settings, request.owner), request.deadline)
    logger.info("dry run %s of %s: %s in %.1f s", request.request_id, request.owner, next(iter(reply)), time.monotonic() - started)
    send_dry_run_reply(_redis, request.request_id, reply)
