"""What one ``POST /jobs`` costs in Redis: the commands the API sends, counted with ``MONITOR``.

Every round trip with ``appendfsync always`` waits for a disk flush, so the count bounds the
submit latency (bench/README.md). A submit is the token lookup, one Lua script (rate window,
idempotency key, active-job quota, the record and its indexes) and one more that lists the job in its
queue's pending set and wakes the dispatcher (which sends kombu's ``LPUSH`` when a worker is free); a
change that adds a round trip must change this test.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.auth import TokenStore
from shared.scheduler import DISPATCHER_CLIENT_NAME
from tests.conftest import api_process
from tests.fixtures import example_spec
from trainq.stack import LocalStack

#: A Redis database of its own: MONITOR shows each command's database, so the session's worker
#: (on database 0) is not counted.
DB = 9


@pytest.fixture(scope="module")
def api_on_own_db(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, redis.Redis]]:
    url = stack.env["REDIS_URL"].rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    with api_process(stack, tmp_path_factory.mktemp("round-trips"), REDIS_URL=url) as api:
        yield api, client
    client.flushdb()
    client.close()


def _commands_of(client: redis.Redis, action) -> list[str]:
    """The names of the commands sent to database ``DB`` by clients (not by Lua scripts, not by the
    API's dispatcher, which a submit wakes: its connections are named) during ``action()``."""
    seen: list[dict] = []
    ready, marker = threading.Event(), f"end-of-test-{uuid.uuid4().hex}"
    ender = redis.Redis(connection_pool=redis.ConnectionPool(**client.connection_pool.connection_kwargs))
    ender.ping()  # connected now: its HELLO and SELECT are not counted

    def watch() -> None:
        with client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if marker in command["command"]:
                    return
                seen.append(command)

    watcher = threading.Thread(target=watch)
    watcher.start()
    ready.wait(5)
    try:
        action()
    finally:
        ender.get(marker)
        watcher.join(10)
        ender.close()
    dispatcher = {entry["addr"] for entry in client.client_list() if entry.get("name") == DISPATCHER_CLIENT_NAME}
    assert dispatcher, "the API's dispatcher has no named connection"
    return [
        c["command"].split()[0].upper() for c in seen
        if c["db"] == DB and c["client_type"] != "lua" and f"{c['client_address']}:{c['client_port']}" not in dispatcher
    ]


def test_a_submit_is_three_redis_round_trips(api_on_own_db: tuple[LocalStack, redis.Redis]):
    api, client = api_on_own_db
    token = TokenStore(client).create(f"trips-{uuid.uuid4().hex[:8]}")
    spec = example_spec() | {"queue": "test-nobody-listens"}
    with httpx.Client(base_url=api.api_url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as http:
        http.post("/jobs", json=spec).raise_for_status()  # connections opened, the script loaded
        key = {"Idempotency-Key": uuid.uuid4().hex}
        created = _commands_of(client, lambda: http.post("/jobs", json=spec, headers=key).raise_for_status())
        replayed = _commands_of(client, lambda: http.post("/jobs", json=spec, headers=key).raise_for_status())
    # token, the whole record, the pending set (the dispatcher woken in the same script; it sends
    # the Celery message itself, when a worker of the queue is free)
    assert created == ["HGETALL", "EVALSHA", "EVALSHA"]
    assert replayed == ["HGETALL", "EVALSHA"]  # an idempotent replay sends no second message
