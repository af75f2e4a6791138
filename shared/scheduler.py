"""The dispatcher: which pending job goes to a worker next, and which running job makes room.

Celery stays the transport; the policy lives here. Jobs wait in the pending set of their queue
(:mod:`shared.pending`) and get their Celery message only when a worker of that queue is free, so
the order is decided at that moment, by:

1. **priority** (the spec's ``priority``, higher first);
2. the owner's **fair-share deficit**: its share (``FAIR_SHARE_WEIGHTS``, normalized over the owners
   competing) minus its part of their load, where an owner's load is the GPUs its jobs hold now
   (running or dispatched) plus its decayed usage divided by the half-life (GPU-seconds,
   ``FAIR_SHARE_HALF_LIFE_S``, as Slurm's PriorityDecayHalfLife); the owner furthest below its
   share goes first;
3. **age** (oldest first; a preempted or retried job keeps its creation time).

A worker is free when it is alive (:mod:`shared.workers`), runs no job (its status and the running
jobs' records agree) and no dispatched job is on its way to it. When a job waits and no worker of
its queue is free, the lowest-priority preemptible job running on that queue with a lower priority
is asked to stop (``preempt_requested_at``); its worker checkpoints it and it goes back to pending
as ``preempted``, to resume bit-identically later.

One dispatcher acts at a time: every API process runs a :class:`Dispatcher` thread, and the one
holding the Redis lease ``trainq:lease:dispatcher`` dispatches; the others wait to take over when
it stops renewing. Every move from pending to Celery is fenced by that lease (:meth:`PendingSet.claim`).
A submit or a worker falling idle wakes it at once (:func:`wake`), so a job on an idle cluster is
sent within a Redis round trip of its submit.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import redis
from celery import Celery

from shared.exceptions import JobNotFoundError
from shared.jobs import INDEX_KEY, RUNNING_KEY, JobStore
from shared.lease import JobLease
from shared.pending import PENDING_OWNER_KEY, PENDING_STATES, PendingSet, priority_of
from shared.queue import enqueue, queue_depth
from shared.records import JOB_KEY, JobRecord, JobState
from shared.schemas import OwnerShare
from shared.settings import Settings
from shared.spec import DEFAULT_PRIORITY
from shared.workers import live_workers

logger = logging.getLogger(__name__)

#: A list the dispatcher blocks on between passes; any push wakes it.
WAKE_KEY = "trainq:dispatcher:wake"
#: Decayed GPU-seconds per owner: ``owner -> [gpu_seconds, at]`` (JSON), as of ``at``.
USAGE_KEY = "trainq:usage"
#: GPU-seconds charged so far for one attempt (``<job_id>:<attempt>``), so a charge counts each second once.
CHARGED_KEY = "trainq:usage:charged:{}:{}"
#: The lease of the acting dispatcher (a :class:`JobLease` named ``dispatcher``).
LEASE_NAME = "dispatcher"
#: The dispatcher's Redis connections' name (`CLIENT LIST` tells them from the routes' connections).
DISPATCHER_CLIENT_NAME = "trainq-dispatcher"
LEASE_TTL_S = 10.0
#: A dispatched job no worker has started within this is put back in pending (its worker vanished).
DISPATCH_TIMEOUT_S = 60.0
#: Seconds between sweeps for startable jobs in no pending set (a process died between two steps).
SWEEP_INTERVAL_S = 15.0

#: Charge an attempt up to ``ARGV[2]`` GPU-seconds in all. KEYS: usage, the attempt's charged key.
#: ARGV: owner, GPU-seconds of the attempt so far, now, half-life (s), TTL of the charged key (s).
_CHARGE = """
local delta = tonumber(ARGV[2]) - tonumber(redis.call('GET', KEYS[2]) or '0')
if delta <= 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[5])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local now, half = tonumber(ARGV[3]), tonumber(ARGV[4])
local value = 0
if raw then
  local old = cjson.decode(raw)
  value = old[1] * math.pow(2, -math.max(0, now - old[2]) / half)
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({value + delta, now}))
return 1
"""
_REQUEST_PREEMPT = """
if KEYS[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'state') ~= '"running"' then return 0 end
local asked = redis.call('HGET', KEYS[1], 'preempt_requested_at')
if asked and asked ~= 'null' then return 0 end
redis.call('HSET', KEYS[1], 'preempt_requested_at', ARGV[2])
return 1
"""


def wake(client: redis.Redis) -> None:
    """Wake the dispatcher now (a job became pending, a worker fell idle); at most one wake waits."""
    pipe = client.pipeline(transaction=False)
    pipe.lpush(WAKE_KEY, "1")
    pipe.ltrim(WAKE_KEY, 0, 0)
    pipe.execute()


def make_pending(client: redis.Redis, record: JobRecord) -> None:
    """List a newly recorded job in its queue's pending set and wake the dispatcher (the submit path:
    one round trip, ``tests/api/test_submit_round_trips.py``)."""
    PendingSet(client).push(record.id, record.queue, record.owner, record.spec.priority, record.created_at, wake_key=WAKE_KEY)


def waiting_jobs(client: redis.Redis, queue: str) -> int:
    """Jobs waiting on ``queue``: pending for the dispatcher, plus messages in Celery's lists no worker took."""
    return PendingSet(client).pending_count(queue) + queue_depth(client, queue)


def owner_shares(store: JobStore, queue: str, settings: Settings) -> list[OwnerShare]:
    """Each owner with jobs pending or running on ``queue``: counts, normalized share, decayed usage."""
    pending = PendingSet(store.redis)
    owners = pending.owners(queue)
    pipe = store.redis.pipeline(transaction=False)
    for owner in owners:
        pipe.zcard(PENDING_OWNER_KEY.format(queue, owner))
    waiting = dict(zip(owners, pipe.execute()))
    running: dict[str, int] = {}
    held = [m.decode() for m in store.redis.smembers(RUNNING_KEY)] + list(pending.dispatched(queue))
    pipe = store.redis.pipeline(transaction=False)
    for job_id in held:
        pipe.hmget(JOB_KEY.format(job_id), ("owner", "queue"))
    for owner, job_queue in pipe.execute():
        if owner is not None and json.loads(job_queue) == queue:
            running[json.loads(owner)] = running.get(json.loads(owner), 0) + 1
    names = sorted({o for o, n in waiting.items() if n} | set(running))
    weights = {owner: settings.fair_share_weights.get(owner, 1.0) for owner in names}
    used = usage(store.redis, settings.fair_share_half_life_s)
    return [
        OwnerShare(owner=owner, pending=waiting.get(owner, 0), running=running.get(owner, 0),
                   share=weights[owner] / sum(weights.values()), usage_gpu_s=used.get(owner, 0.0))
        for owner in names
    ]


def preempt_requested(client: redis.Redis, job_id: str) -> bool:
    """True once the dispatcher asked the running attempt of ``job_id`` to stop (one HGET)."""
    value = client.hget(JOB_KEY.format(job_id), "preempt_requested_at")
    return value is not None and json.loads(value) is not None


def usage(client: redis.Redis, half_life_s: float, now: float | None = None) -> dict[str, float]:
    """Each owner's decayed usage in GPU-seconds, as of ``now``."""
    now = time.time() if now is None else now
    out = {}
    for owner, raw in client.hgetall(USAGE_KEY).items():
        value, at = json.loads(raw)
        out[owner.decode()] = value * 2 ** (-max(0.0, now - at) / half_life_s)
    return out


class AttemptMeter:
    """Charges one running attempt's GPU-seconds to its owner's usage, as it goes and at its end.

    Each call charges what the attempt used since the last one (GPUs × seconds since the attempt
    entered ``running``), whoever calls, so a charge never counts a second twice.
    """

    def __init__(self, client: redis.Redis, record: JobRecord, half_life_s: float) -> None:
        self.redis, self.owner, self.half_life_s = client, record.owner, half_life_s
        self.gpus = record.spec.resources.gpus
        self.started_at = next(t.at for t in reversed(record.transitions) if t.state is JobState.RUNNING)
        self.key = CHARGED_KEY.format(record.id, record.attempts)
        self._charge = client.register_script(_CHARGE)

    def charge(self, now: float | None = None) -> None:
        """Bring the owner's usage up to date with this attempt (raises on a Redis error)."""
        now = time.time() if now is None else now
        used = self.gpus * max(0.0, now - self.started_at)
        ttl = int(max(self.half_life_s * 10, 3600))
        self._charge(keys=[USAGE_KEY, self.key], args=[self.owner, used, now, self.half_life_s, ttl])


@dataclass
class Held:
    """A job that holds a worker: running, or dispatched and on its way."""

    job_id: str
    owner: str
    queue: str
    gpus: int
    priority: int
    preemptible: bool
    worker: str | None = None
    running: bool = False
    preempt_requested: bool = False
    started_at: float = 0.0


@dataclass
class Candidate:
    """An owner's next pending job on a queue."""

    job_id: str
    owner: str
    priority: int
    score: float  # pending.rank: priority, then age


@dataclass
class Snapshot:
    """What one pass sees: live workers, the jobs holding them, each owner's load."""

    idle: dict[str, set[str]]  # queue -> names of live workers of that queue that run nothing
    worker_queues: dict[str, list[str]]  # live worker -> the queues it consumes
    held: list[Held]
    load: dict[str, float] = field(default_factory=dict)  # owner -> GPUs held + usage / half-life

    def running_jobs(self, owner: str) -> int:
        """Jobs of ``owner`` running or on their way to a worker (``MAX_RUNNING_JOBS_PER_OWNER`` counts these)."""
        return sum(1 for h in self.held if h.owner == owner)


def deficits(owners: list[str], load: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Each owner's fair-share deficit among ``owners``: its share of the weights minus its share
    of the load (both normalized over ``owners``); an owner without a weight has 1. Higher: further
    behind, served first."""
    total_weight = sum(weights.get(owner, 1.0) for owner in owners) or 1.0
    total_load = sum(load.get(owner, 0.0) for owner in owners)
    return {
        owner: weights.get(owner, 1.0) / total_weight - (load.get(owner, 0.0) / total_load if total_load > 0 else 0.0)
        for owner in owners
    }


def choose(candidates: list[Candidate], load: dict[str, float], weights: dict[str, float]) -> Candidate | None:
    """The next job among owners' heads: highest priority, then largest deficit, then oldest."""
    if not candidates:
        return None
    top = max(c.priority for c in candidates)
    level = [c for c in candidates if c.priority == top]
    deficit = deficits([c.owner for c in level], load, weights)
    return min(level, key=lambda c: (-round(deficit[c.owner], 9), c.score, c.job_id))


class Dispatcher(threading.Thread):
    """Moves pending jobs to Celery by policy while this process holds the dispatcher lease.

    Args:
        store: the job store (its Redis holds the pending sets, the workers' status, the lease).
        celery: the app that sends the training task.
    """

    def __init__(self, store: JobStore, celery: Celery, settings: Settings) -> None:
        super().__init__(name="trainq-dispatcher", daemon=True)
        self.store, self.celery, self.settings = store, celery, settings
        self.pending = PendingSet(store.redis)
        self.lease = JobLease(store.redis, LEASE_NAME, LEASE_TTL_S, owner=f"{socket.gethostname()}")
        self.leading = False
        self._stopped = threading.Event()
        self._last_sweep = 0.0
        self._request_preempt = store.redis.register_script(_REQUEST_PREEMPT)
        self._served: dict[str, int] = {}  # queue -> the dispatch count when it was last served
        self._turn = 0

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        interval = self.settings.dispatch_interval_s
        while not self._stopped.is_set():
            try:
                self.leading = self.lease.renew() if self.leading else self.lease.acquire()
                if not self.leading:
                    self._stopped.wait(interval)
                    continue
                self.dispatch_once()
                self.store.redis.blpop([WAKE_KEY], timeout=max(interval, 0.01))  # a submit or an idle worker wakes it
            except redis.RedisError as exc:
                logger.warning("dispatcher: Redis unavailable (%s)", exc)
                self._stopped.wait(interval)
            except Exception:
                logger.exception("dispatcher: pass failed")
                self._stopped.wait(interval)

    def stop(self) -> None:
        """End the loop and give the lease up, so another process takes over at once."""
        self._stopped.set()
        try:
            wake(self.store.redis)
        except redis.RedisError:
            pass
        if self.is_alive():
            self.join(timeout=5)
        if self.leading:
            try:
                self.lease.release()
            except redis.RedisError:
                pass  # it expires

    # -- one pass ------------------------------------------------------------------------------
    def dispatch_once(self) -> list[str]:
        """One pass: send pending jobs to free workers, ask for preemptions for those still waiting,
        and now and then sweep; returns the ids dispatched."""
        if time.monotonic() - self._last_sweep > SWEEP_INTERVAL_S:
            self._last_sweep = time.monotonic()
            self.sweep()
        snapshot = self.snapshot()
        queues = [queue for queue in self.queues() if self.pending.owners(queue)]
        sent = self._fill(queues, snapshot)
        for queue in queues:
            if not self._free(queue, snapshot):
                self._preempt(queue, self.pending.owners(queue), snapshot)
        return sent

    def _fill(self, queues: list[str], snapshot: Snapshot) -> list[str]:
        """Dispatch while a queue with pending jobs has a free worker. Within a queue: :func:`choose`;
        between queues a worker serves: the higher priority, then the queue served least recently."""
        heads = {queue: self.pending.heads(queue, self.pending.owners(queue)) for queue in queues}
        sent = []
        while True:
            options = []
            for queue, owners in heads.items():
                if owners and self._free(queue, snapshot):
                    candidates = [Candidate(job_id, owner, priority_of(score), score) for owner, (job_id, score) in owners.items()
                                  if self._under_quota(owner, snapshot)]
                    best = choose(candidates, snapshot.load, self.settings.fair_share_weights)
                    if best is not None:
                        options.append((queue, best))
            if not options:
                return sent
            queue, best = min(options, key=lambda option: (-option[1].priority, self._served.get(option[0], 0)))
            claimed = self.pending.claim(best.job_id, queue, best.owner, lease_key=self.lease.key, token=self.lease.token)
            if claimed < 0:
                self.leading = False
                return sent
            if claimed:
                held = self._send(best, queue)
                if held is None:
                    return sent
                self._turn += 1
                self._served[queue] = self._turn
                snapshot.held.append(held)
                snapshot.load[best.owner] = snapshot.load.get(best.owner, 0.0) + held.gpus
                self._take_idle(queue, snapshot)
                sent.append(best.job_id)
            heads[queue].pop(best.owner)
            heads[queue].update(self.pending.heads(queue, [best.owner]))  # the owner's next job, if any

    def _send(self, chosen: Candidate, queue: str) -> Held | None:
        """Send ``chosen``'s Celery message; on failure put it back in pending (None)."""
        record = self.store.get(chosen.job_id)
        try:
            enqueue(self.celery, chosen.job_id, queue)
        except Exception:
            logger.exception("job %s: could not send to queue %s; it stays pending", chosen.job_id, queue)
            self.pending.undispatch(chosen.job_id, queue, chosen.owner, chosen.priority, record.created_at)
            return None
        logger.info("job %s: dispatched to %s (owner %s, priority %d)", chosen.job_id, queue, chosen.owner, chosen.priority)
        spec = record.spec
        return Held(chosen.job_id, chosen.owner, queue, spec.resources.gpus, spec.priority, spec.preemptible)

    def queues(self) -> list[str]:
        """The configured queues and any other a job was submitted to (the settings may have changed)."""
        return sorted(set(self.settings.queues) | set(self.store.queues()))

    def _under_quota(self, owner: str, snapshot: Snapshot) -> bool:
        limit = self.settings.max_running_jobs_per_owner
        return limit is None or snapshot.running_jobs(owner) < limit

    # -- who is free ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Live workers, which of them run nothing, the jobs running or dispatched, each owner's load."""
        workers = live_workers(self.store.redis)
        held = self._held()
        busy = {w.name for w in workers if w.current_job} | {h.worker for h in held if h.running and h.worker}
        idle: dict[str, set[str]] = {}
        for worker in workers:
            if worker.name not in busy:
                for queue in worker.queues:
                    idle.setdefault(queue, set()).add(worker.name)
        snapshot = Snapshot(idle=idle, worker_queues={w.name: w.queues for w in workers}, held=held)
        half_life = self.settings.fair_share_half_life_s
        snapshot.load = {owner: value / half_life for owner, value in usage(self.store.redis, half_life).items()}
        for job in held:
            snapshot.load[job.owner] = snapshot.load.get(job.owner, 0.0) + job.gpus
        # A dispatched job takes one idle worker of its queue (which one, Celery decides).
        for job in held:
            if not job.running:
                self._take_idle(job.queue, snapshot)
        return snapshot

    @staticmethod
    def _take_idle(queue: str, snapshot: Snapshot) -> None:
        """Count one idle worker of ``queue`` as taken: the one serving the fewest other queues."""
        names = snapshot.idle.get(queue)
        if not names:
            return
        name = min(names, key=lambda n: (len(snapshot.worker_queues.get(n, [])), n))
        for served in snapshot.worker_queues.get(name, [queue]):
            snapshot.idle.get(served, set()).discard(name)

    @staticmethod
    def _free(queue: str, snapshot: Snapshot) -> bool:
        return bool(snapshot.idle.get(queue))

    def _held(self) -> list[Held]:
        """Jobs running (by the running set) and dispatched (by each queue's dispatched set)."""
        running = [member.decode() for member in self.store.redis.smembers(RUNNING_KEY)]
        dispatched = [job_id for queue in self.queues() for job_id in self.pending.dispatched(queue)]
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in running + dispatched:
            pipe.hmget(JOB_KEY.format(job_id), ("owner", "queue", "spec", "worker", "state", "preempt_requested_at", "transitions"))
        held = []
        for index, (job_id, values) in enumerate(zip(running + dispatched, pipe.execute())):
            if values[0] is None:
                continue
            owner, queue, spec, worker, state, asked, transitions = (json.loads(v) if v is not None else None for v in values)
            is_running = index < len(running)
            if is_running and state != JobState.RUNNING.value:
                continue
            resources = spec.get("resources") or {}
            held.append(Held(
                job_id, owner, queue, int(resources.get("gpus", 1)), int(spec.get("priority", DEFAULT_PRIORITY)),
                bool(spec.get("preemptible", True)), worker if is_running else None, is_running, asked is not None,
                transitions[-1]["at"] if transitions else 0.0,
            ))
        return held

    # -- preemption ------------------------------------------------------------------------------
    def _preempt(self, queue: str, owners: list[str], snapshot: Snapshot) -> list[str]:
        """Ask running jobs of ``queue`` to stop for the pending jobs of higher priority, lowest first."""
        heads = self.pending.heads(queue, owners)
        if not heads:
            return []
        top = max(priority_of(score) for _, score in heads.values())
        on_queue = [h for h in snapshot.held if h.queue == queue and h.running]
        victims = sorted(
            (h for h in on_queue if h.preemptible and h.priority < top and not h.preempt_requested),
            key=lambda h: (h.priority, -h.started_at),
        )
        if not victims:
            return []
        # Jobs that outrank some preemptible running job, less those already being made room for.
        stopping = sum(1 for h in on_queue if h.preempt_requested)
        waiting = self.pending.count_above(queue, list(heads), min(h.priority for h in on_queue if h.preemptible))
        asked = []
        for victim in victims[: max(0, waiting - stopping)]:
            result = self._request_preempt(keys=[JOB_KEY.format(victim.job_id), self.lease.key], args=[self.lease.token, time.time()])
            if result < 0:
                self.leading = False
                break
            if result:
                victim.preempt_requested = True
                logger.info("job %s: preemption requested (priority %d; a job of priority %d waits on %s)",
                            victim.job_id, victim.priority, top, queue)
                asked.append(victim.job_id)
        return asked

    # -- repair ----------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Put back in pending every startable job that is in no pending set (its process died between
        recording and listing it) and every dispatched one no worker took within
        :data:`DISPATCH_TIMEOUT_S`; returns how many."""
        fixed = 0
        queues = self.queues()
        listed = set().union(*(self.pending.pending_ids(queue) for queue in queues))
        sent = {job_id: when for queue in queues for job_id, when in self.pending.dispatched(queue).items()}
        now = time.time()
        for state in PENDING_STATES:
            for member in self.store.redis.zrange(f"{INDEX_KEY}:state:{state}", 0, -1):
                job_id = member.decode()
                if job_id in listed or now - sent.get(job_id, 0.0) < DISPATCH_TIMEOUT_S:
                    continue  # pending, or on its way to a worker
                try:
                    record = self.store.get(job_id)
                except JobNotFoundError:
                    continue
                if record.state.value not in PENDING_STATES or now - record.transitions[-1].at < SWEEP_INTERVAL_S:
                    continue  # moved on, or just recorded: its submit or transition is listing it now
                args = (job_id, record.queue, record.owner, record.spec.priority, record.created_at)
                if self.pending.undispatch(*args) if job_id in sent else self.pending.push(*args):
                    logger.warning("job %s: was in no pending set (or its worker never took it); put back", job_id)
                    fixed += 1
        return fixed
