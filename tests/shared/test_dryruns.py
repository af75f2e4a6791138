"""The dry-run queue on the session stack's Redis, without a worker: owners are served in turn, and a
request whose API gave up is freed at once and skipped by the worker (:mod:`shared.dryruns`)."""

from __future__ import annotations

import asyncio
import uuid

import redis
import redis.asyncio

from shared.dryruns import OWNER_ACTIVE_KEY, request_dry_run, take_next_dry_run
from shared.queue import make_celery
from tests.fixtures import example_spec


def test_owners_are_served_in_turn_and_a_given_up_request_is_skipped(stack):
    queue, suffix = f"dry-run-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:6]
    heavy, light = f"heavy-{suffix}", f"light-{suffix}"
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    app = make_celery(stack.settings)

    async def scenario() -> list[str]:
        aclient = redis.asyncio.Redis.from_url(stack.env["REDIS_URL"])

        def ask(owner: str) -> asyncio.Task:
            wait = request_dry_run(app, aclient, example_spec(), queue, 60, owner=owner, per_owner=5, overall=1000)
            return asyncio.create_task(wait)

        async def queued(owner: str, count: int) -> None:
            while client.zcard(OWNER_ACTIVE_KEY.format(owner)) < count:
                await asyncio.sleep(0.05)

        waits = []
        for _ in range(3):
            waits.append(ask(heavy))
            await queued(heavy, len(waits))
        waits.append(ask(light))
        await queued(light, 1)
        waits[1].cancel()  # the client of heavy's second dry run went away
        await asyncio.gather(waits[1], return_exceptions=True)
        assert client.zcard(OWNER_ACTIVE_KEY.format(heavy)) == 2  # its place is free at once
        served = [request.owner for request in iter(lambda: take_next_dry_run(client, queue), None)]
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await aclient.aclose()
        return served

    assert asyncio.run(scenario()) == [heavy, light, heavy]  # heavy's second was given up: skipped
