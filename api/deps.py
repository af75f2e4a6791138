"""FastAPI dependencies: the job store and the Celery app, built once per process in the lifespan."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from shared.jobs import JobStore
from shared.settings import Settings


def get_store(request: Request) -> JobStore:
    """The process's :class:`JobStore` (set up by the app's lifespan)."""
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    """The process's Celery app, used only to send tasks."""
    return request.app.state.celery


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
