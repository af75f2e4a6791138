"""The dispatcher's policy and bookkeeping on a real Redis (no API, no worker processes): pending
sets following the lifecycle, dispatch order, the lease's fence, preemption requests, the sweep.

Workers appear as the status records real workers publish (:func:`tests.shared.conftest.publish_worker`);
dispatched messages land in Celery's own Redis lists (a real Celery app, no consumer).
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from shared.jobs import JobStore
from shared.pending import PendingSet
from shared.queue import make_celery, queue_depth
from shared.records import JobState
from shared.scheduler import (
    AttemptMeter,
    Candidate,
    Dispatcher,
    choose,
    deficits,
    owner_shares,
    preempt_requested,
    usage,
)
from shared.settings import Settings
from shared.spec import JobSpec
from tests.fixtures import example_spec
from tests.shared.conftest import publish_worker


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, queues=["default", "other"], fair_share_half_life_s=3600)


@pytest.fixture
def store(settings: Settings) -> JobStore:
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    return JobStore(client)


def submit(store: JobStore, owner: str, queue: str = "default", **spec: object) -> str:
    record, _ = store.create(JobSpec.model_validate(example_spec() | spec), queue, owner=owner)
    PendingSet(store.redis).push(record.id, queue, owner, record.spec.priority, record.created_at)
    time.sleep(0.002)  # distinct ages
    return record.id


def start(store: JobStore, job_id: str, worker_name: str) -> None:
    """What a worker does when it takes the job."""
    store.transition(job_id, JobState.RUNNING, worker=worker_name)
    publish_worker(store, worker_name, current_job=job_id)


@pytest.fixture
def dispatcher(store: JobStore, settings: Settings) -> Dispatcher:
    d = Dispatcher(store, make_celery(settings), settings)
    assert d.lease.acquire()
    return d


def test_choose_orders_by_priority_then_deficit_then_age():
    old, young = Candidate("a1", "alice", 50, 1.0), Candidate("b1", "bob", 50, 2.0)
    assert choose([young, old], {}, {}) is old  # equal load: the older
    assert choose([young, old], {"alice": 1.0}, {}) is young  # alice holds a GPU: bob is behind his share
    assert choose([young, old], {"alice": 1.0, "bob": 1.0}, {"alice": 3.0}) is old  # alice's share is 3/4
    urgent = Candidate("b2", "bob", 90, 3.0)
    assert choose([old, urgent], {"bob": 10.0}, {}) is urgent  # priority first, whatever the load
    assert deficits(["alice", "bob"], {"alice": 3.0, "bob": 1.0}, {}) == {"alice": -0.25, "bob": 0.25}


def test_pending_set_follows_the_lifecycle_and_a_preempted_job_keeps_its_age(store: JobStore):
    pending = PendingSet(store.redis)
    first, second = submit(store, "alice"), submit(store, "alice")
    assert sorted(pending.pending_ids("default")) == sorted([first, second])
    assert pending.heads("default", ["alice"])["alice"][0] == first
    store.transition(first, JobState.RUNNING, worker="w1")
    assert pending.pending_ids("default") == [second] and pending.heads("default", ["alice"])["alice"][0] == second
    store.transition(first, JobState.PREEMPTED, reason="preempted at step 3")
    assert pending.heads("default", ["alice"])["alice"][0] == first  # older: ahead again
    assert pending.pending_count("default") == 2
    store.request_cancel(second)
    assert pending.pending_ids("default") == [first]
    assert not pending.push(second, "default", "alice", 50, 0.0)  # a cancelled job is never pending again


def test_dispatch_sends_one_job_per_free_worker_alternating_owners(store: JobStore, dispatcher: Dispatcher):
    alice = [submit(store, "alice") for _ in range(3)]
    bob = [submit(store, "bob") for _ in range(3)]
    publish_worker(store, "w1")
    publish_worker(store, "w2")
    assert dispatcher.dispatch_once() == [alice[0], bob[0]]  # alice is older; then she holds one
    assert queue_depth(store.redis, "default") == 2
    assert dispatcher.dispatch_once() == []  # both workers have a job on its way
    start(store, alice[0], "w1")
    start(store, bob[0], "w2")
    store.transition(bob[0], JobState.SUCCEEDED)
    publish_worker(store, "w2")
    assert dispatcher.dispatch_once() == [bob[1]]  # alice still holds w1


def test_priority_beats_age_and_quota_holds_an_owner_back(store: JobStore, dispatcher: Dispatcher, settings: Settings):
    low = submit(store, "alice")
    high = submit(store, "bob", priority=60)
    publish_worker(store, "w1")
    assert dispatcher.dispatch_once() == [high]
    dispatcher.settings = settings.model_copy(update={"max_running_jobs_per_owner": 1})
    publish_worker(store, "w2")
    other = submit(store, "bob", priority=60)
    assert dispatcher.dispatch_once() == [low]  # bob is at his limit of 1
    assert PendingSet(store.redis).pending_ids("default") == [other]


def test_a_dispatcher_without_the_lease_moves_nothing(store: JobStore, dispatcher: Dispatcher, settings: Settings):
    job = submit(store, "alice")
    publish_worker(store, "w1")
    usurper = Dispatcher(store, make_celery(settings), settings)
    assert not usurper.lease.acquire()
    assert usurper.dispatch_once() == [] and not usurper.leading
    assert PendingSet(store.redis).pending_ids("default") == [job]
    assert dispatcher.dispatch_once() == [job]


def test_a_waiting_job_of_higher_priority_preempts_the_lowest_preemptible_one(store: JobStore, dispatcher: Dispatcher):
    started = []
    for owner, spec, name in (("carol", {"priority": 5, "preemptible": False}, "w1"), ("alice", {"priority": 30}, "w2"),
                              ("alice", {"priority": 10}, "w3")):
        job = submit(store, owner, **spec)
        publish_worker(store, name)
        assert dispatcher.dispatch_once() == [job]
        start(store, job, name)
        started.append(job)
    guarded, mid, low = started
    submit(store, "bob", priority=30)
    assert dispatcher.dispatch_once() == []  # no worker free
    assert [preempt_requested(store.redis, job) for job in (guarded, mid, low)] == [False, False, True]
    dispatcher.dispatch_once()
    assert not preempt_requested(store.redis, mid)  # one job waits, one is already stopping
    submit(store, "bob", priority=60)
    dispatcher.dispatch_once()
    assert preempt_requested(store.redis, mid) and not preempt_requested(store.redis, guarded)
    # The worker's side: the attempt stops and the job is pending again, behind the higher ones.
    preempted = store.transition(low, JobState.PREEMPTED, reason="preempted at step 7", expect_attempt=1)
    assert preempted.state is JobState.PREEMPTED and preempted.transitions[-1].reason == "preempted at step 7"
    assert low in PendingSet(store.redis).pending_ids("default")
    again = store.transition(low, JobState.RUNNING, worker="w3")
    assert again.attempts == 2 and again.preempt_requested_at is None


def test_sweep_lists_a_job_its_submit_never_listed_and_usage_decays(store: JobStore, dispatcher: Dispatcher):
    record, _ = store.create(JobSpec.model_validate(example_spec()), "default", owner="alice")  # the API died here
    store.redis.hset(f"trainq:job:{record.id}", "transitions", json.dumps([{"state": "queued", "at": time.time() - 60}]))
    assert dispatcher.sweep() == 1 and PendingSet(store.redis).pending_ids("default") == [record.id]
    assert dispatcher.sweep() == 0



def test_an_attempt_is_charged_once_per_second_used_and_usage_decays(store: JobStore):
    job = submit(store, "alice", resources={"gpus": 2})
    record = store.transition(job, JobState.RUNNING, worker="w1")
    meter, again = AttemptMeter(store.redis, record, 3600), AttemptMeter(store.redis, record, 3600)
    start = record.transitions[-1].at
    meter.charge(start + 30)
    again.charge(start + 40)  # another caller (the attempt's end) charges only what is new
    meter.charge(start + 40)
    expected = 60 * 2 ** (-10 / 3600) + 20  # 2 GPUs × 30 s, decayed for 10 s, then 2 × 10 s
    assert usage(store.redis, 3600, start + 40)["alice"] == pytest.approx(expected, rel=1e-6)
    assert usage(store.redis, 3600, start + 40 + 3600)["alice"] == pytest.approx(expected / 2, rel=1e-6)  # a half-life later


def test_owner_shares_count_each_owners_jobs_and_normalize_weights(store: JobStore, dispatcher: Dispatcher, settings: Settings):
    running = submit(store, "alice")
    publish_worker(store, "w1")
    assert dispatcher.dispatch_once() == [running]
    start(store, running, "w1")
    submit(store, "alice")
    submit(store, "bob")
    submit(store, "bob")
    shares = owner_shares(store, "default", settings.model_copy(update={"fair_share_weights": {"alice": 3.0}}))
    assert [(s.owner, s.pending, s.running, s.share) for s in shares] == [("alice", 1, 1, 0.75), ("bob", 2, 0, 0.25)]
