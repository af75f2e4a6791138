"""The trainq worker: ``celery -A worker worker`` consumes the job queue and trains.

The Celery app is loaded lazily (``worker.app``) so that importing the training engine
(``worker.training``) never imports Celery.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `celery -A worker` looks up `worker.app`, then `worker.celery`.
    if name in {"app", "celery"}:
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
