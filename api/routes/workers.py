"""``GET /workers``, ``GET /queues`` and ``GET /queues/shares``: which workers are alive, how many jobs
wait where, and each owner's jobs, fair share and usage per queue.

Workers report themselves to Redis (:mod:`shared.workers`); the API never imports torch.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from api.deps import PrincipalDep, SettingsDep, StoreDep
from shared.exceptions import JobNotFoundError
from shared.scheduler import owner_shares, waiting_jobs
from shared.schemas import QueueInfo, QueueList, QueueShares, SharesList, WorkerList
from shared.workers import live_workers

router = APIRouter(tags=["workers"])


class NoQuery(BaseModel):
    """These routes take no query parameters; any is refused (422)."""

    model_config = ConfigDict(extra="forbid")


@router.get("/workers", response_model=WorkerList)
def read_workers(store: StoreDep, principal: PrincipalDep, _: Annotated[NoQuery, Query()]) -> WorkerList:
    """Live workers: name, host, queues, device (CUDA, GPU names and memory), current job, last heartbeat.

    The current job is shown only to its owner and admins (others see `null`)."""
    workers = live_workers(store.redis)
    if not principal.admin:
        for worker in workers:
            if worker.current_job is not None:
                try:
                    visible = principal.can_see(store.get(worker.current_job).owner)
                except JobNotFoundError:
                    visible = False
                if not visible:
                    worker.current_job = None
    return WorkerList(data=workers)


@router.get("/queues", response_model=QueueList)
def read_queues(
    store: StoreDep, settings: SettingsDep, _principal: PrincipalDep, _: Annotated[NoQuery, Query()]
) -> QueueList:
    """Each queue: jobs waiting (`depth`: pending, or sent and not yet taken) and live workers consuming it."""
    workers = live_workers(store.redis)
    names = set(store.queues()) | {settings.default_queue} | {queue for worker in workers for queue in worker.queues}
    return QueueList(
        data=[
            QueueInfo(name=name, depth=waiting_jobs(store.redis, name), workers=sum(name in w.queues for w in workers))
            for name in sorted(names)
        ]
    )


@router.get("/queues/shares", response_model=SharesList)
def read_shares(
    store: StoreDep, settings: SettingsDep, principal: PrincipalDep, _: Annotated[NoQuery, Query()]
) -> SharesList:
    """Per queue, each owner with jobs pending or running there: the counts, its fair share (`FAIR_SHARE_WEIGHTS`,
    normalized over those owners) and its decayed GPU-seconds. Yours only, unless you are an admin."""
    names = sorted(set(store.queues()) | {settings.default_queue})
    return SharesList(
        data=[
            QueueShares(queue=name, owners=[o for o in owner_shares(store, name, settings) if principal.can_see(o.owner)])
            for name in names
        ]
    )
