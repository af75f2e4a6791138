"""Job records in Redis: state, timestamps, progress, device, error and artifact URIs.

A record is a Redis hash ``trainq:job:<id>`` whose fields are JSON values; the sorted set
``trainq:jobs`` (score: creation time, seconds since the epoch) lists ids newest first, and
``trainq:jobs:owner:<owner>`` the same for one owner (so an owner's list stays fast); the set
``trainq:running`` holds the ids of running jobs (what the reaper inspects), and
``trainq:active:<owner>`` an owner's jobs that are not final (their quota). The list filters have
indexes of their own, sorted by creation time like ``trainq:jobs``: ``trainq:jobs:<field>:<value>``
and ``trainq:jobs:owner:<owner>:<field>:<value>`` for ``state``, ``queue`` and ``name`` (the
state's move with each transition), so a filtered page reads only the jobs it returns. State changes go
through :meth:`JobStore.transition`, which checks the lifecycle in a Redis transaction
(WATCH/MULTI), so the API, a worker and a reaper never both win a race.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from enum import Enum
from typing import Any

import redis
import redis.asyncio
from pydantic import BaseModel

from shared.exceptions import (
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    QuotaExceededError,
)
from shared.numbers import parse_float
from shared.pending import PENDING_STATES, enlist, unlist
from shared.quotas import COUNT_CALL_LUA, RATE_KEY, rate_exceeded
from shared.records import (
    ALLOWED_TRANSITIONS,
    ANONYMOUS_OWNER,
    JOB_KEY,
    STARTABLE_STATES,
    SUMMARY_FIELDS,
    JobRecord,
    JobsPage,
    JobState,
    JobSummary,
    Progress,
    Transition,
)
from shared.spec import DEFAULT_PRIORITY, JobSpec

INDEX_KEY = "trainq:jobs"
OWNER_INDEX_KEY = "trainq:jobs:owner:{}"
ACTIVE_KEY = "trainq:active:{}"
RUNNING_KEY = "trainq:running"
#: Every queue a job was ever submitted to (``GET /queues``).
QUEUES_KEY = "trainq:queues"
IDEMPOTENCY_KEY = "trainq:idempotency:{}"
IDEMPOTENCY_TTL_S = 24 * 3600
#: Fields of a record that ``GET /jobs`` can filter on; each has an index per value.
FILTER_FIELDS = ("state", "queue", "name")
#: Index entries a filtered list examines at most per page (the page may come back short, with a
#: cursor to go on): bounds the work of a page whatever the number of jobs.
MAX_SCANNED_PER_PAGE = 2000


def index_keys(owner: str, **values: str | None) -> list[str]:
    """The sorted-set keys that list a job of ``owner`` with these filter values (``state=…``,
    ``queue=…``, ``name=…``; None skips a field): one for every owner, one for ``owner``."""
    keys = []
    for field, value in values.items():
        if value is not None:
            keys += [f"{INDEX_KEY}:{field}:{value}", owner_index_key(owner, field, value)]
    return keys


def owner_index_key(owner: str, field: str, value: str) -> str:
    """The sorted set of ``owner``'s jobs whose ``field`` (state, queue, name) is ``value``."""
    return f"{OWNER_INDEX_KEY.format(owner)}:{field}:{value}"


def encode_cursor(score: float, job_id: str) -> str:
    """An opaque cursor for the position just after ``(score, job_id)`` in newest-first order."""
    return base64.urlsafe_b64encode(f"{score!r} {job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """``(score, job_id)`` of a cursor from :func:`encode_cursor`.

    Raises:
        ValueError: not such a cursor.
    """
    try:
        score, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(" ", 1)
        return parse_float(score), job_id  # strict: "nan" reached Redis as a score (issue 17)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not a cursor from a previous page: {cursor[:40]!r}") from exc


def _matches(summary: JobSummary, wanted: dict[str, str]) -> bool:
    """True when ``summary`` has every ``field: value`` of ``wanted`` (state, queue, name)."""
    found = {"state": summary.state.value, "queue": summary.queue, "name": summary.name}
    return all(found[field] == value for field, value in wanted.items())


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif isinstance(value, Enum):
            value = value.value
        out[name] = json.dumps(value)
    return out


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {key.decode(): json.loads(value) for key, value in raw.items()}


#: ``MAX_PENDING_JOBS_PER_OWNER`` counts an owner's jobs in the pending states (waiting to start, or
#: sent to a worker that has not taken them yet) from its state indexes: the submit script writes
#: the new job's and every transition moves them in its own transaction, so the count is exact at
#: the moment of a submit (the pending sets are filled just after the record, so two concurrent
#: submits could both miss each other there).
PENDING_STATE_COUNT = len(PENDING_STATES)


#: Records a submission atomically; KEYS: rate window, idempotency key (or ``""``), the owner's
#: active set, the job's hash, the queues set, the owner's state indexes of the pending states
#: (:data:`PENDING_STATE_COUNT` of them: its jobs waiting to start), then every index the new job
#: goes into. ARGV: now, window (s), submissions allowed per window (-1: none counted), the
#: window's member, the idempotency value (``[id, spec digest]`` as JSON), the spec digest, max
#: active jobs (-1: no limit), the TTL of the idempotency key (s), the job id, its creation time
#: (the index score), its queue, max pending jobs (-1: no limit), then the record's field/value
#: pairs. Returns ``{"created"}``, ``{"rate", wait_s}``, ``{"replay", id, fields...}``,
#: ``{"conflict", id}``, ``{"quota", active}`` or ``{"pending_quota", pending}``.
_SUBMIT = COUNT_CALL_LUA + """
local now, window, per_minute = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if per_minute >= 0 then
  local wait = count_call(KEYS[1], now, window, per_minute, ARGV[4])
  if wait then return {'rate', wait} end
end
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then
    local claimed = cjson.decode(existing)
    if claimed[2] ~= ARGV[6] then return {'conflict', tostring(claimed[1])} end
    local reply = {'replay', tostring(claimed[1])}
    for _, item in ipairs(redis.call('HGETALL', JOB_PREFIX .. claimed[1])) do reply[#reply + 1] = item end
    return reply
  end
end
local max_active = tonumber(ARGV[7])
if max_active >= 0 then
  local active = redis.call('SCARD', KEYS[3])
  if active >= max_active then return {'quota', tostring(active)} end
end
local max_pending = tonumber(ARGV[12])
if max_pending >= 0 then
  local pending = 0
  for i = 6, 5 + PENDING_STATE_COUNT do pending = pending + redis.call('ZCARD', KEYS[i]) end
  if pending >= max_pending then return {'pending_quota', tostring(pending)} end
end
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[8]) end
redis.call('HSET', KEYS[4], unpack(ARGV, 13))
local id, score = ARGV[9], ARGV[10]
for i = 6 + PENDING_STATE_COUNT, #KEYS do redis.call('ZADD', KEYS[i], score, id) end
redis.call('SADD', KEYS[3], id)
redis.call('SADD', KEYS[5], ARGV[11])
return {'created'}
""".replace("JOB_PREFIX", repr(JOB_KEY.format(""))).replace("PENDING_STATE_COUNT", str(PENDING_STATE_COUNT))


class _Submission:
    """The keys and arguments of one :data:`_SUBMIT` call, and what its reply means."""

    def __init__(
        self, spec: JobSpec, queue: str, owner: str, idempotency_key: str | None, max_active: int | None,
        per_minute: int | None, max_pending: int | None = None, window_s: float = 60.0,
    ) -> None:
        now = time.time()
        self.record = JobRecord(
            id=uuid.uuid4().hex,
            owner=owner,
            name=spec.name,
            state=JobState.QUEUED,
            spec=spec,
            queue=queue,
            created_at=now,
            progress=Progress(epochs=spec.epochs),
            transitions=[Transition(state=JobState.QUEUED, at=now)],
        )
        self.idempotency_key, self.per_minute, self.window_s = idempotency_key, per_minute, window_s
        self.max_active, self.max_pending = max_active, max_pending
        digest, idempotency = "", ""
        if idempotency_key is not None:
            digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
            idempotency = IDEMPOTENCY_KEY.format(f"{owner}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}")
        record = self.record
        fields = _encode(record.model_dump(mode="json", exclude_none=True))
        self.keys = [
            RATE_KEY.format(owner), idempotency, ACTIVE_KEY.format(owner), JOB_KEY.format(record.id), QUEUES_KEY,
            *(owner_index_key(owner, "state", state) for state in PENDING_STATES),
            INDEX_KEY, OWNER_INDEX_KEY.format(owner),
            *index_keys(owner, state=record.state.value, queue=record.queue, name=record.name),
        ]
        self.args = [
            now, window_s, -1 if per_minute is None else per_minute, uuid.uuid4().hex, json.dumps([record.id, digest]),
            digest, -1 if max_active is None else max_active, IDEMPOTENCY_TTL_S, record.id, record.created_at, queue,
            -1 if max_pending is None else max_pending,
            *(item for pair in fields.items() for item in pair),
        ]

    def outcome(self, reply: list) -> tuple[JobRecord, bool]:
        """``(record, created)`` from the script's reply, or the error it stands for."""
        kind = reply[0].decode()
        if kind == "created":
            return self.record, True
        if kind == "rate":
            raise rate_exceeded(self.record.owner, self.per_minute, self.window_s, reply[1])
        if kind == "conflict":
            raise IdempotencyConflictError(self.idempotency_key, reply[1].decode())
        if kind == "quota":
            raise QuotaExceededError(
                f"owner {self.record.owner!r} has {int(reply[1])} jobs queued or running; the limit is {self.max_active} "
                "(MAX_ACTIVE_JOBS_PER_OWNER): wait for one to finish or cancel one",
                retry_after_s=60,
            )
        if kind == "pending_quota":
            raise QuotaExceededError(
                f"owner {self.record.owner!r} has {int(reply[1])} jobs waiting to start (queued, retrying or preempted); "
                f"the limit is {self.max_pending} (MAX_PENDING_JOBS_PER_OWNER): wait for some to start or cancel one",
                retry_after_s=60,
            )
        fields = dict(zip(reply[2::2], reply[3::2]))  # "replay": the job the key returned
        if not fields:
            raise JobNotFoundError(reply[1].decode())
        return JobRecord.model_validate(_decode(fields)), False


class JobStore:
    """Creates, reads and updates job records in Redis.

    Args:
        client: a ``redis.Redis`` connected to the job database (``REDIS_URL``).
    """

    def __init__(self, client: redis.Redis, async_client: redis.asyncio.Redis | None = None) -> None:
        self.redis = client
        #: The same database for the API's ``async`` routes (None outside the API).
        self.aredis = async_client
        self._update_if_exists = client.register_script(_UPDATE_IF_EXISTS)
        self._submit = client.register_script(_SUBMIT)
        self._asubmit = async_client.register_script(_SUBMIT) if async_client is not None else None

    @classmethod
    def from_url(cls, url: str, *, with_async: bool = False) -> JobStore:
        """A store on a new connection pool to ``url`` (``redis://host:port/db``); ``with_async``:
        also an asyncio client (:attr:`aredis`, for :meth:`create_async`)."""
        async_client = redis.asyncio.Redis.from_url(url, health_check_interval=30) if with_async else None
        return cls(redis.Redis.from_url(url, health_check_interval=30), async_client)

    def create(
        self,
        spec: JobSpec,
        queue: str,
        *,
        owner: str = ANONYMOUS_OWNER,
        idempotency_key: str | None = None,
        max_active: int | None = None,
        max_pending: int | None = None,
        per_minute: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Record a new ``queued`` job of ``owner`` for ``spec`` on ``queue``.

        With ``idempotency_key``, the first call records the job and later calls by the same
        owner with the same key (for 24 hours) return that job instead of a new one. Keys are
        per owner: another owner's key never returns, or reveals, someone else's job.

        Every check and write is one Lua script (:data:`_SUBMIT`), so it is atomic and one round
        trip: the rate window, the idempotency key, the active-job and pending-job quotas, then
        the record and its indexes. A refused call writes nothing but its place in the rate window.

        Args:
            max_active: refuse when ``owner`` already has this many jobs queued, running or
                retrying.
            max_pending: refuse when ``owner`` already has this many jobs waiting to start
                (queued, retrying or preempted, on any queue).
            per_minute: first count the call in ``owner``'s submission window
                (:func:`shared.quotas.count_submission`); refuse past this many a minute.

        Returns:
            ``(record, created)``; ``created`` is False when the key returned an existing job.

        Raises:
            IdempotencyConflictError: the owner used the key before with a different spec.
            QuotaExceededError: ``owner`` is at ``max_active`` or ``max_pending``, or over ``per_minute``.
        """
        submission = _Submission(spec, queue, owner, idempotency_key, max_active, per_minute, max_pending)
        return submission.outcome(self._submit(keys=submission.keys, args=submission.args))

    async def create_async(
        self,
        spec: JobSpec,
        queue: str,
        *,
        owner: str = ANONYMOUS_OWNER,
        idempotency_key: str | None = None,
        max_active: int | None = None,
        max_pending: int | None = None,
        per_minute: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """:meth:`create` on the asyncio client (:attr:`aredis`), for the API's event loop.

        Raises:
            RuntimeError: the store has no asyncio client (``from_url(..., with_async=True)``).
        """
        if self._asubmit is None:
            raise RuntimeError("this JobStore has no asyncio client")
        submission = _Submission(spec, queue, owner, idempotency_key, max_active, per_minute, max_pending)
        return submission.outcome(await self._asubmit(keys=submission.keys, args=submission.args))

    def get(self, job_id: str) -> JobRecord:
        """The record of ``job_id``.

        Raises:
            JobNotFoundError: no such job.
        """
        raw = self.redis.hgetall(JOB_KEY.format(job_id))
        if not raw:
            raise JobNotFoundError(job_id)
        return JobRecord.model_validate(_decode(raw))

    def ids_starting_with(self, prefix: str, *, owner: str | None = None, limit: int = 10) -> list[str]:
        """Up to ``limit`` ids of jobs that start with ``prefix`` (``owner``'s jobs, or everyone's), sorted.

        A scan of the owner's index (everyone's for ``owner=None``): O(jobs in it), for short ids
        typed by people. ``prefix`` must be lowercase hex (it is a match pattern).

        Raises:
            ValueError: ``prefix`` is not lowercase hex.
        """
        if not prefix or prefix.strip("0123456789abcdef"):
            raise ValueError(f"a job id prefix is lowercase hex, not {prefix!r}")
        key = INDEX_KEY if owner is None else OWNER_INDEX_KEY.format(owner)
        found: list[str] = []
        for member, _ in self.redis.zscan_iter(key, match=f"{prefix}*", count=1000):
            found.append(member.decode())
            if len(found) >= limit:
                break
        return sorted(found)

    def list(
        self,
        *,
        owner: str | None = None,
        state: JobState | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        max_scanned: int = MAX_SCANNED_PER_PAGE,
    ) -> JobsPage:
        """Up to ``limit`` job summaries, newest first, after ``cursor``, matching every filter given.

        The page walks the smallest index among the filters (Redis sorted sets by creation time)
        and checks the other filters on each summary, examining at most ``max_scanned`` jobs
        (then the page may be short, with a cursor): its cost does not grow with the number of jobs.

        Args:
            owner: only this owner's jobs; None lists every owner's.
            cursor: ``next_cursor`` of the previous page.

        Raises:
            ValueError: ``cursor`` is not a cursor from a previous page.
        """
        values = {"state": state.value if state is not None else None, "queue": queue, "name": name}
        wanted = {field: value for field, value in values.items() if value is not None}
        base = INDEX_KEY if owner is None else OWNER_INDEX_KEY.format(owner)
        candidates = [f"{base}:{field}:{value}" for field, value in wanted.items()] or [base]
        sizes = [self.redis.zcard(key) for key in candidates]
        driver = candidates[sizes.index(min(sizes))]
        after = decode_cursor(cursor) if cursor else None
        summaries: list[JobSummary] = []
        scanned, position, more = 0, None, False
        chunks = self._walk(driver, after, batch=min(max(limit, 50), max_scanned))
        for whole in chunks:
            chunk = whole[: max_scanned - scanned]  # the budget is a hard bound on the records read
            for index, ((job_id, score), summary) in enumerate(zip(chunk, self._summaries([i for i, _ in chunk]))):
                scanned, position = scanned + 1, (score, job_id)
                if summary is not None and _matches(summary, wanted):
                    summaries.append(summary)
                if len(summaries) == limit or scanned >= max_scanned:
                    more = index < len(whole) - 1 or next(chunks, None) is not None
                    break
            else:
                continue
            break
        return JobsPage(
            data=summaries,
            next_cursor=encode_cursor(*position) if more and position is not None else None,
            count=min(sizes) if len(candidates) == 1 else None,
        )

    def _walk(self, key: str, after: tuple[float, str] | None, batch: int) -> Iterator[list[tuple[str, float]]]:
        """Chunks of ``(job_id, score)`` of sorted set ``key``, newest first, strictly after ``after``.

        Equal scores come in descending id order (ZREVRANGEBYSCORE's), which the cursor follows.
        """
        top = "+inf" if after is None else repr(after[0])
        offset = 0
        while True:
            rows = self.redis.zrevrangebyscore(key, top, "-inf", start=offset, num=batch, withscores=True)
            offset += len(rows)
            chunk = [
                (member.decode(), score)
                for member, score in rows
                if after is None or score < after[0] or member.decode() < after[1]
            ]
            if chunk:
                yield chunk
            if len(rows) < batch:
                return

    def _summaries(self, job_ids: list[str]) -> list[JobSummary | None]:
        """Summaries of ``job_ids`` in order (None for a record that is gone), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(JOB_KEY.format(job_id), SUMMARY_FIELDS)
        summaries: list[JobSummary | None] = []
        for values in pipe.execute():
            fields = {name: json.loads(value) for name, value in zip(SUMMARY_FIELDS, values) if value is not None}
            summaries.append(JobSummary.model_validate(fields) if "state" in fields else None)
        return summaries

    def owner_job_ids(self, owner: str, *, limit: int) -> tuple[list[str], int]:
        """The ids of ``owner``'s newest ``limit`` jobs (any state), newest first, and how many it has."""
        key = OWNER_INDEX_KEY.format(owner)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrange(key, 0, limit - 1)
        pipe.zcard(key)
        ids, total = pipe.execute()
        return [member.decode() for member in ids], int(total)

    def queues(self) -> list[str]:
        """Every queue a job was submitted to, sorted."""
        return sorted(member.decode() for member in self.redis.smembers(QUEUES_KEY))

    def count_by_state(self) -> dict[JobState, int]:
        """Jobs in each state, over every owner (one ZCARD per state)."""
        pipe = self.redis.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(f"{INDEX_KEY}:state:{state.value}")
        return dict(zip(JobState, pipe.execute()))

    def rebuild_indexes(self) -> int:
        """Write the filter indexes of every job (records made before they existed); return the count."""
        job_ids = [member.decode() for member in self.redis.zrange(INDEX_KEY, 0, -1)]
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            read = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                read.hmget(JOB_KEY.format(job_id), ("owner", "state", "queue", "name", "created_at"))
            write = self.redis.pipeline(transaction=False)
            for job_id, values in zip(chunk, read.execute()):
                if values[1] is None:
                    continue
                owner, state, queue, name, created_at = (json.loads(v) if v is not None else None for v in values)
                for key in index_keys(owner or ANONYMOUS_OWNER, state=state, queue=queue, name=name):
                    write.zadd(key, {job_id: created_at})
                write.sadd(QUEUES_KEY, queue)
            write.execute()
        return len(job_ids)

    def running_ids(self) -> list[str]:
        """Ids of jobs in the ``running`` state."""
        return sorted(member.decode() for member in self.redis.smembers(RUNNING_KEY))

    def transition(
        self,
        job_id: str,
        state: JobState,
        *,
        reason: str | None = None,
        expect_attempt: int | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Move ``job_id`` to ``state``, setting ``fields`` in the same transaction.

        The change is timestamped (with ``reason``) in ``transitions``; entering ``running``
        counts an attempt and sets ``started_at`` the first time; a final state sets
        ``finished_at``.

        Args:
            expect_attempt: a fencing token: refuse unless the job is on this attempt, so a
                worker that lost its job to a retry cannot overwrite the new attempt's state.

        Raises:
            JobNotFoundError: no such job.
            InvalidTransitionError: the lifecycle forbids going from the current state to
                ``state``, or the job is no longer on ``expect_attempt``.
        """
        key = JOB_KEY.format(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hgetall(key)
                    if not raw:
                        raise JobNotFoundError(job_id)
                    current = _decode(raw)
                    previous = JobState(current["state"])
                    attempts = current.get("attempts", 0)
                    if state not in ALLOWED_TRANSITIONS[previous]:
                        raise InvalidTransitionError(job_id, previous.value, state.value)
                    if expect_attempt is not None and attempts != expect_attempt:
                        raise InvalidTransitionError(
                            job_id, f"{previous.value} (attempt {attempts})", f"{state.value} from attempt {expect_attempt}"
                        )
                    now = time.time()
                    update = dict(fields, state=state)
                    entry = {"state": state.value, "at": now} | ({"reason": reason} if reason else {})
                    update["transitions"] = current["transitions"] + [entry]
                    if state is JobState.RUNNING:
                        update["attempts"] = attempts + 1
                        update["preempt_requested_at"] = None  # a request was for the attempt before
                        update.setdefault("started_at", current.get("started_at") or now)
                    if state.is_final:
                        update["finished_at"] = now
                    if state in (JobState.RUNNING, JobState.SUCCEEDED, JobState.CANCELLED) and "error" not in fields:
                        update["error"] = None  # an earlier attempt's error stays in `transitions` (its reason)
                    if state is JobState.SUCCEEDED and "progress" not in fields and (current.get("progress") or {}).get("phase"):
                        # nothing is being done any more; a failed or cancelled job keeps the phase it stopped in
                        update["progress"] = current["progress"] | {"phase": None}
                    owner = current.get("owner", ANONYMOUS_OWNER)
                    pipe.multi()
                    pipe.hset(key, mapping=_encode(update))
                    for index in index_keys(owner, state=previous.value):
                        pipe.zrem(index, job_id)
                    for index in index_keys(owner, state=state.value):
                        pipe.zadd(index, {job_id: current["created_at"]})
                    if state is JobState.RUNNING:
                        pipe.sadd(RUNNING_KEY, job_id)
                    else:
                        pipe.srem(RUNNING_KEY, job_id)
                    if state.is_final:
                        pipe.srem(ACTIVE_KEY.format(owner), job_id)
                    if (previous in STARTABLE_STATES) != (state in STARTABLE_STATES):  # the pending set follows the state
                        if state in STARTABLE_STATES:
                            priority = current["spec"].get("priority", DEFAULT_PRIORITY)
                            enlist(pipe, job_id, current["queue"], owner, priority, current["created_at"])
                        else:
                            unlist(pipe, job_id, current["queue"], owner)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self.get(job_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel ``job_id``: at once if it has not started, else ask its worker to stop.

        A queued, retrying or preempted job becomes ``cancelled`` (a later delivery skips it). A running
        job gets ``cancel_requested_at``; its worker stops at the next step boundary, saves a
        checkpoint and ends it ``cancelled``.

        Raises:
            JobNotFoundError: no such job.
            InvalidTransitionError: the job is already final.
        """
        key = JOB_KEY.format(job_id)
        while True:
            state = self.get(job_id).state
            if state in STARTABLE_STATES:
                try:
                    return self.transition(job_id, JobState.CANCELLED, reason="cancelled by request")
                except InvalidTransitionError:
                    continue  # it started meanwhile: ask the worker instead
            if state is JobState.RUNNING:
                with self.redis.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(key)
                        if JobState(json.loads(pipe.hget(key, "state"))) is not JobState.RUNNING:
                            continue
                        pipe.multi()
                        pipe.hsetnx(key, "cancel_requested_at", json.dumps(time.time()))
                        pipe.execute()
                    except redis.WatchError:
                        continue
                return self.get(job_id)
            raise InvalidTransitionError(job_id, state.value, JobState.CANCELLED.value)

    def cancel_requested(self, job_id: str) -> bool:
        """True once a cancel was requested for ``job_id`` (one cheap HEXISTS)."""
        return bool(self.redis.hexists(JOB_KEY.format(job_id), "cancel_requested_at"))

    def count_duplicate_delivery(self, job_id: str) -> None:
        """Note on the record that a queue delivery for ``job_id`` was skipped."""
        self.redis.hincrby(JOB_KEY.format(job_id), "duplicate_deliveries", 1)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set ``fields`` (progress, device, dataset, artifacts…) without changing the state.

        Raises:
            JobNotFoundError: no such job (an update never creates a record).
        """
        flat: list[str] = []
        for name, value in _encode(fields).items():
            flat += [name, value]
        if not self._update_if_exists(keys=[JOB_KEY.format(job_id)], args=flat):
            raise JobNotFoundError(job_id)


# HSET on a missing key would create a half record; only write fields of an existing one.
_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
