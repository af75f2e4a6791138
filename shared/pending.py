"""The pending set of each queue: jobs waiting for the dispatcher, and those it has sent to Celery.

A job in a startable state (``queued``, ``retrying``, ``preempted``) is *pending* until the
dispatcher (:mod:`shared.scheduler`) sends its Celery message. Per queue, in Redis:

* ``trainq:pending:<queue>:owner:<owner>`` — a sorted set of that owner's pending jobs, score
  :func:`rank` (priority first, then age), so the head of each owner's set is its next job;
* ``trainq:pending:<queue>:owners`` — the owners that have pending jobs there;
* ``trainq:pending:<queue>`` — a list of the same ids, unordered: its length is what KEDA scales
  on (its Redis scaler reads a list's length) and what ``GET /queues`` counts;
* ``trainq:dispatched:<queue>`` — jobs sent to Celery whose worker has not taken them yet (score:
  when sent): they hold a worker, so the dispatcher counts them.

Membership follows the lifecycle: :meth:`shared.jobs.JobStore.transition` calls :func:`enlist`
when a job enters a startable state and :func:`unlist` when it leaves one, in its own transaction;
a new job is pushed right after it is recorded (:func:`push`). Moving a job from pending to
dispatched is one Lua script (:func:`claim`), fenced by the dispatcher's lease, so two dispatchers
never send the same job and a job is never in neither place. A process that dies between two of
these steps leaves a job the dispatcher's sweep puts back (:meth:`shared.scheduler.Dispatcher.sweep`).
"""

from __future__ import annotations

import json
import time

import redis

from shared.records import JOB_KEY, STARTABLE_STATES

PENDING_KEY = "trainq:pending:{}"
PENDING_OWNER_KEY = "trainq:pending:{}:owner:{}"
PENDING_OWNERS_KEY = "trainq:pending:{}:owners"
DISPATCHED_KEY = "trainq:dispatched:{}"
#: States of a pending job, as the record's JSON holds them.
PENDING_STATES = tuple(sorted(state.value for state in STARTABLE_STATES))
#: A rank step per priority point: larger than any age score (seconds since the epoch).
_PRIORITY_STEP = 1e10


def rank(priority: int, created_at: float) -> float:
    """The score of a pending job: lower first. Higher ``priority`` (0–100) first, then older
    ``created_at`` (seconds since the epoch); exact to about 0.1 ms."""
    return (100 - priority) * _PRIORITY_STEP + created_at


def priority_of(score: float) -> int:
    """The priority a :func:`rank` score was made from."""
    return 100 - int(score // _PRIORITY_STEP)


def enlist(pipe: redis.client.Pipeline, job_id: str, queue: str, owner: str, priority: int, created_at: float) -> None:
    """Queue the commands that make ``job_id`` pending (inside the caller's MULTI; the caller
    knows it was not pending: it is entering a startable state)."""
    pipe.zadd(PENDING_OWNER_KEY.format(queue, owner), {job_id: rank(priority, created_at)})
    pipe.sadd(PENDING_OWNERS_KEY.format(queue), owner)
    pipe.lrem(PENDING_KEY.format(queue), 0, job_id)  # never twice in the list
    pipe.rpush(PENDING_KEY.format(queue), job_id)


def unlist(pipe: redis.client.Pipeline, job_id: str, queue: str, owner: str) -> None:
    """Queue the commands that take ``job_id`` out of pending and dispatched (it started, or was
    cancelled or failed before it started). An owner's emptied set leaves ``owners`` at the next pass."""
    pipe.zrem(PENDING_OWNER_KEY.format(queue, owner), job_id)
    pipe.lrem(PENDING_KEY.format(queue), 0, job_id)
    pipe.zrem(DISPATCHED_KEY.format(queue), job_id)


#: Make a job pending if it is startable and neither pending nor dispatched. KEYS: the owner's set,
#: owners, the list, dispatched, the job's hash, and the dispatcher's wake list ('' for none: pushed
#: to when the job was added, in this one round trip of the submit). ARGV: id, score, owner, the
#: pending states (JSON). Returns 1 when it was added.
_PUSH = """
local function woken(added)
  if added == 1 and KEYS[6] ~= '' then
    redis.call('LPUSH', KEYS[6], '1')
    redis.call('LTRIM', KEYS[6], 0, 0)
  end
  return added
end
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
local state = redis.call('HGET', KEYS[5], 'state')
local startable = false
for _, s in ipairs(cjson.decode(ARGV[4])) do if state == cjson.encode(s) then startable = true end end
if not startable then return 0 end
if redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[1])
return woken(1)
"""

#: Move a job from pending to dispatched. KEYS: the dispatcher's lease ('' for none), the owner's
#: set, owners, the list, dispatched, the job's hash. ARGV: the lease token, id, now, owner, the
#: pending states (JSON). Returns 1 when moved, 0 when it is no longer pending, -1 when the lease is lost.
_CLAIM = """
if KEYS[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('ZREM', KEYS[2], ARGV[2]) == 0 then return 0 end
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[4]) end
redis.call('LREM', KEYS[4], 0, ARGV[2])
local state = redis.call('HGET', KEYS[6], 'state')
for _, s in ipairs(cjson.decode(ARGV[5])) do
  if state == cjson.encode(s) then
    redis.call('ZADD', KEYS[5], ARGV[3], ARGV[2])
    return 1
  end
end
return 0
"""

#: Take an owner out of a queue's owners when its set is empty. KEYS: owners, the owner's set. ARGV: owner.
_PRUNE = """
if redis.call('ZCARD', KEYS[2]) == 0 then return redis.call('SREM', KEYS[1], ARGV[1]) end
return 0
"""


class PendingSet:
    """The pending and dispatched jobs of every queue, on one Redis (the job store's)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._push = client.register_script(_PUSH)
        self._claim = client.register_script(_CLAIM)
        self._prune = client.register_script(_PRUNE)

    def push(self, job_id: str, queue: str, owner: str, priority: int, created_at: float, *, wake_key: str = "") -> bool:
        """Make ``job_id`` pending unless it already is, is dispatched, or is not startable; True if added
        (and then, with a ``wake_key``, the dispatcher woken in the same script)."""
        keys = [PENDING_OWNER_KEY.format(queue, owner), PENDING_OWNERS_KEY.format(queue), PENDING_KEY.format(queue),
                DISPATCHED_KEY.format(queue), JOB_KEY.format(job_id), wake_key]
        return bool(self._push(keys=keys, args=[job_id, rank(priority, created_at), owner, json.dumps(PENDING_STATES)]))

    def claim(self, job_id: str, queue: str, owner: str, *, lease_key: str = "", token: str = "") -> int:
        """Move ``job_id`` from pending to dispatched: 1 done, 0 no longer pending (started, cancelled),
        -1 ``lease_key`` is not held with ``token`` any more (another dispatcher took over)."""
        keys = [lease_key, PENDING_OWNER_KEY.format(queue, owner), PENDING_OWNERS_KEY.format(queue), PENDING_KEY.format(queue),
                DISPATCHED_KEY.format(queue), JOB_KEY.format(job_id)]
        return int(self._claim(keys=keys, args=[token, job_id, time.time(), owner, json.dumps(PENDING_STATES)]))

    def undispatch(self, job_id: str, queue: str, owner: str, priority: int, created_at: float) -> bool:
        """Put a dispatched job back in pending (its message could not be sent, or no worker took it); True if so."""
        if not self.redis.zrem(DISPATCHED_KEY.format(queue), job_id):
            return False
        return self.push(job_id, queue, owner, priority, created_at)

    def owners(self, queue: str) -> list[str]:
        """Owners with pending jobs on ``queue`` (perhaps a few whose last job just left)."""
        return sorted(member.decode() for member in self.redis.smembers(PENDING_OWNERS_KEY.format(queue)))

    def heads(self, queue: str, owners: list[str]) -> dict[str, tuple[str, float]]:
        """Each owner's next job on ``queue``: ``{owner: (job_id, score)}``; owners with none are pruned."""
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.zrange(PENDING_OWNER_KEY.format(queue, owner), 0, 0, withscores=True)
        heads = {}
        for owner, rows in zip(owners, pipe.execute()):
            if rows:
                heads[owner] = (rows[0][0].decode(), rows[0][1])
            else:
                self._prune(keys=[PENDING_OWNERS_KEY.format(queue), PENDING_OWNER_KEY.format(queue, owner)], args=[owner])
        return heads

    def count_above(self, queue: str, owners: list[str], priority: int) -> int:
        """Pending jobs on ``queue`` with a priority above ``priority``."""
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.zcount(PENDING_OWNER_KEY.format(queue, owner), "-inf", f"({rank(priority, 0)}")
        return sum(pipe.execute())

    def pending_count(self, queue: str) -> int:
        """Jobs pending on ``queue`` (the length of its list)."""
        return int(self.redis.llen(PENDING_KEY.format(queue)))

    def pending_ids(self, queue: str) -> list[str]:
        """Ids of the jobs pending on ``queue``, in no particular order."""
        return [member.decode() for member in self.redis.lrange(PENDING_KEY.format(queue), 0, -1)]

    def dispatched(self, queue: str) -> dict[str, float]:
        """Jobs sent to ``queue``'s Celery list that no worker has started: ``{job_id: when sent}``."""
        return {member.decode(): score for member, score in self.redis.zrange(DISPATCHED_KEY.format(queue), 0, -1, withscores=True)}
