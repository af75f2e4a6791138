"""The dry-run queue: fair between owners, bounded, and waited on without holding a thread.

``POST /jobs?dry_run=true`` must not let one owner hurt another (issue 17):

* **Bounded.** :func:`request_dry_run` admits a dry run only while its owner has fewer than
  ``DRY_RUNS_PER_OWNER`` and all owners together fewer than ``DRY_RUNS_MAX`` dry runs waiting or
  running; past either it raises :class:`~shared.exceptions.QuotaExceededError` (the API's 429)
  with the seconds until the oldest of them ends. Both counts are sorted sets of request ids
  scored by their deadline, so a crashed API process frees its places when the deadline passes.
* **Fair.** A request is kept in its owner's list (``trainq:dry-run:<queue>:pending:<owner>``) and
  its owner in the queue's rotation (``trainq:dry-run:<queue>:owners``); the Celery message on
  ``DRY_RUN_QUEUE`` is only a ticket naming the queue: the worker that takes one serves the next
  owner in turn (:func:`take_next_dry_run`).
  So one owner's backlog is served one request per turn, beside everybody else's, not in front.
  Every request sends one ticket and a ticket serves at most one request that is still wanted, so
  there are always at least as many tickets as requests waiting (tickets never expire; one that
  finds nothing is a no-op).
* **Asynchronous.** The API polls the reply list on its asyncio Redis pool (a connection is held
  for one ``LPOP``, never for the whole wait, so waiting dry runs cannot exhaust the pool either).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio
from celery import Celery

from shared.exceptions import QuotaExceededError

#: Requests waiting or running, all owners: sorted set of request id → deadline (epoch seconds).
ACTIVE_KEY = "trainq:dry-run:active"
#: The same, per owner.
OWNER_ACTIVE_KEY = "trainq:dry-run:active:{}"
#: An owner's requests on a queue not yet taken by a worker, oldest first (JSON of :class:`DryRunRequest`).
PENDING_KEY = "trainq:dry-run:{queue}:pending:{owner}"
#: Owners with requests pending on a queue, in the order they are served.
ROTATION_KEY = "trainq:dry-run:{queue}:owners"
#: Redis list a dry run's reply is pushed to, by request id.
REPLY_KEY = "trainq:dry-run:{}"
#: Seconds a reply waits in Redis for the API process that asked (it may have given up).
REPLY_TTL_S = 60
#: Name of the dry-run task (a ticket; its one argument is the queue; the request comes from its rotation).
DRY_RUN_TASK = "trainq.dry_run"
#: Seconds between the API's looks at the reply list: from the first to the last, doubling.
_POLL_FIRST_S, _POLL_MAX_S = 0.05, 0.5

#: Lua: admit one request (KEYS: active, owner's active, owner's pending, rotation; ARGV: now,
#: deadline, request id, per-owner bound, overall bound, owner, request JSON, TTL). Returns false
#: when admitted, else ``{which bound, seconds until its oldest request ends}``.
_ADMIT = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
for i, bound in ipairs({{KEYS[2], 'owner', ARGV[4]}, {KEYS[1], 'all', ARGV[5]}}) do
  if redis.call('ZCARD', bound[1]) >= tonumber(bound[3]) then
    local oldest = redis.call('ZRANGE', bound[1], 0, 0, 'WITHSCORES')
    return {bound[2], tostring(tonumber(oldest[2]) - now)}
  end
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[i], ARGV[8])
end
if redis.call('RPUSH', KEYS[3], ARGV[7]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[6])
end
redis.call('EXPIRE', KEYS[3], ARGV[8])
return false
"""

#: Lua: the oldest pending request of the next owner in turn, who goes to the back of the rotation
#: if more remain (KEYS: rotation; ARGV: the pending key's prefix). False when none is pending.
_TAKE_NEXT = """
while true do
  local owner = redis.call('LPOP', KEYS[1])
  if not owner then return false end
  local key = ARGV[1] .. owner
  local item = redis.call('LPOP', key)
  if item then
    if redis.call('LLEN', key) > 0 then redis.call('RPUSH', KEYS[1], owner) end
    return item
  end
end
"""


@dataclass(frozen=True)
class DryRunRequest:
    """A dry run waiting for a worker: ``spec`` as JSON, ``deadline`` in seconds since the epoch."""

    request_id: str
    owner: str
    spec: dict[str, Any]
    deadline: float


def _retry_after(owner: str, which: bytes, wait_s: bytes, per_owner: int, overall: int) -> QuotaExceededError:
    if which == b"owner":
        message = f"owner {owner!r} already has {per_owner} dry runs waiting or running (DRY_RUNS_PER_OWNER); try again later"
    else:
        message = f"the service already has {overall} dry runs waiting or running (DRY_RUNS_MAX); try again later"
    return QuotaExceededError(message, retry_after_s=max(1.0, float(wait_s)))


async def _admit(
    client: redis.asyncio.Redis, request: DryRunRequest, queue: str, per_owner: int, overall: int, timeout_s: float
) -> None:
    pending = PENDING_KEY.format(queue=queue, owner=request.owner)
    keys = [ACTIVE_KEY, OWNER_ACTIVE_KEY.format(request.owner), pending, ROTATION_KEY.format(queue=queue)]
    payload = json.dumps(asdict(request))
    ttl_s = int(2 * timeout_s) + 60
    args = [time.time(), request.deadline, request.request_id, per_owner, overall, request.owner, payload, ttl_s]
    refused = await client.register_script(_ADMIT)(keys=keys, args=args)
    if refused:
        raise _retry_after(request.owner, refused[0], refused[1], per_owner, overall)


async def _release(client: redis.asyncio.Redis, request: DryRunRequest, *, unsent_on: str | None = None) -> None:
    """Free ``request``'s places; ``unsent_on``: its ticket to that queue was never sent, so take it out of its list."""
    pipe = client.pipeline(transaction=True)
    pipe.zrem(ACTIVE_KEY, request.request_id)
    pipe.zrem(OWNER_ACTIVE_KEY.format(request.owner), request.request_id)
    if unsent_on is not None:
        pipe.lrem(PENDING_KEY.format(queue=unsent_on, owner=request.owner), 0, json.dumps(asdict(request)))
    await pipe.execute()


async def _wait_for_reply(client: redis.asyncio.Redis, request: DryRunRequest) -> dict[str, Any] | None:
    key, pause = REPLY_KEY.format(request.request_id), _POLL_FIRST_S
    while True:
        reply = await client.lpop(key)
        if reply is not None:
            return json.loads(reply)
        left = request.deadline - time.time()
        if left <= 0:
            return None
        await asyncio.sleep(min(pause, left))
        pause = min(2 * pause, _POLL_MAX_S)


async def request_dry_run(
    app: Celery,
    client: redis.asyncio.Redis,
    spec: dict[str, Any],
    queue: str,
    timeout_s: float,
    *,
    owner: str,
    per_owner: int,
    overall: int,
) -> dict[str, Any] | None:
    """Queue a dry run of ``spec`` for ``owner`` and wait up to ``timeout_s`` seconds for its reply.

    The request joins its owner's list; a ticket goes to ``queue``; the wait polls the reply list
    (see the module's notes). Nothing here holds a thread for the wait: only the ticket's publish
    (kombu blocks) runs in a worker thread, briefly.

    Returns:
        The reply (see :func:`send_dry_run_reply`), or None when none came in time.

    Raises:
        QuotaExceededError: ``owner`` has ``per_owner`` dry runs waiting or running, or all owners
            together ``overall``; ``retry_after_s`` says when one of them ends.
        kombu.exceptions.OperationalError: the ticket could not be sent (the request is withdrawn).
    """
    request = DryRunRequest(uuid.uuid4().hex, owner, spec, time.time() + timeout_s)
    await _admit(client, request, queue, per_owner, overall, timeout_s)
    try:
        await asyncio.to_thread(app.send_task, DRY_RUN_TASK, args=[queue], queue=queue)
    except BaseException:
        await asyncio.shield(_release(client, request, unsent_on=queue))
        raise
    try:
        return await _wait_for_reply(client, request)
    finally:
        # Shielded: a request cancelled while waiting (client gone, shutdown) still frees its places
        # at once (else they are freed when its deadline passes) and its worker skips it.
        await asyncio.shield(_release(client, request))


def take_next_dry_run(client: redis.Redis, queue: str) -> DryRunRequest | None:
    """The next dry run to serve on ``queue``, owners in turn; None when none is still wanted.

    A request whose deadline passed, or whose API process stopped waiting (it left the active
    set), is dropped and the next one taken.
    """
    while True:
        keys, args = [ROTATION_KEY.format(queue=queue)], [PENDING_KEY.format(queue=queue, owner="")]
        item = client.register_script(_TAKE_NEXT)(keys=keys, args=args)
        if item is None:
            return None
        request = DryRunRequest(**json.loads(item))
        if request.deadline > time.time() and client.zscore(ACTIVE_KEY, request.request_id) is not None:
            return request


def send_dry_run_reply(client: redis.Redis, request_id: str, reply: dict[str, Any]) -> None:
    """Hand a dry run's reply to the API process waiting for it.

    ``reply`` is ``{"report": DryRunReport}``, ``{"errors": [{"loc", "msg", "type"}, ...]}`` (a
    422's ``detail``) or ``{"unavailable": message}`` (a 503).
    """
    key = REPLY_KEY.format(request_id)
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(key, json.dumps(reply))
        pipe.expire(key, REPLY_TTL_S)
        pipe.execute()
