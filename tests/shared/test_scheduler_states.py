"""No job lost, none run twice: a Hypothesis rule-based state machine over submit, dispatch, delivery
(also duplicate), finish, preemption, cancel, worker death and dispatcher failover, on a real Redis.

Workers are simulated by what real ones do to Redis: publish their status, take a delivered job by
the transactional ``→ running`` change (a duplicate delivery is skipped), end it by a fenced
transition. After every step the pending bookkeeping must match the records exactly.
"""

from __future__ import annotations

import redis
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shared.exceptions import InvalidTransitionError
from shared.jobs import JobStore
from shared.lease import LEASE_KEY
from shared.pending import PendingSet
from shared.queue import make_celery
from shared.records import STARTABLE_STATES, JobState
from shared.scheduler import LEASE_NAME, Dispatcher, make_pending
from shared.settings import Settings
from shared.spec import JobSpec
from tests.fixtures import example_spec
from tests.shared.conftest import publish_worker

WORKERS = ("w1", "w2")


def test_no_job_is_lost_or_run_twice(redis_url: str):
    settings = Settings(redis_url=redis_url, queues=["default"], fair_share_half_life_s=3600)

    class Scheduling(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            client = redis.Redis.from_url(redis_url)
            client.flushdb()
            self.store = JobStore(client)
            self.pending = PendingSet(client)
            celery = make_celery(settings)
            self.dispatchers = [Dispatcher(self.store, celery, settings) for _ in range(2)]
            assert self.dispatchers[0].lease.acquire()
            self.leader = 0
            self.jobs: list[str] = []
            self.delivered: list[str] = []  # every message sent, duplicates included
            self.runs: dict[str, str] = {}  # job -> worker running it
            for name in WORKERS:
                publish_worker(self.store, name)

        @rule(owner=st.sampled_from(["alice", "bob"]), priority=st.sampled_from([10, 50, 90]))
        def submit(self, owner: str, priority: int) -> None:
            record, _ = self.store.create(JobSpec.model_validate(example_spec() | {"priority": priority}), "default", owner=owner)
            make_pending(self.store.redis, record)
            self.jobs.append(record.id)

        @rule()
        def dispatch(self) -> None:
            self.delivered += self.dispatchers[self.leader].dispatch_once()

        @rule()
        def failover(self) -> None:
            self.store.redis.delete(LEASE_KEY.format(LEASE_NAME))  # the leader's lease expired
            self.leader = 1 - self.leader
            assert self.dispatchers[self.leader].lease.acquire()
            self.dispatchers[self.leader].leading = True

        @rule()
        def stale_leader_dispatches(self) -> None:
            old = self.dispatchers[1 - self.leader]
            assert old.dispatch_once() == []  # without the lease it moves nothing

        @precondition(lambda self: self.delivered)
        @rule(data=st.data(), name=st.sampled_from(WORKERS))
        def deliver(self, data, name: str) -> None:
            job_id = data.draw(st.sampled_from(self.delivered))  # a duplicate delivery now and then
            if name in self.runs.values():
                return
            try:
                self.store.transition(job_id, JobState.RUNNING, worker=name)
            except InvalidTransitionError:
                return  # skipped, as the task skips it
            assert job_id not in self.runs, "a job started twice at once"
            self.runs[job_id] = name
            publish_worker(self.store, name, current_job=job_id)

        @precondition(lambda self: self.runs)
        @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "preempted", "worker lost", "cancelled"]))
        def end(self, data, outcome: str) -> None:
            job_id = data.draw(st.sampled_from(sorted(self.runs)))
            attempt = self.store.get(job_id).attempts
            state = {"succeeded": JobState.SUCCEEDED, "preempted": JobState.PREEMPTED,
                     "worker lost": JobState.RETRYING, "cancelled": JobState.CANCELLED}[outcome]
            self.store.transition(job_id, state, reason=outcome, expect_attempt=attempt)
            publish_worker(self.store, self.runs.pop(job_id))

        @precondition(lambda self: self.jobs)
        @rule(data=st.data())
        def cancel(self, data) -> None:
            job_id = data.draw(st.sampled_from(self.jobs))
            try:
                self.store.request_cancel(job_id)
            except InvalidTransitionError:
                pass

        @rule()
        def sweep(self) -> None:
            self.dispatchers[self.leader].sweep()

        @invariant()
        def every_waiting_job_is_pending_or_dispatched_once(self) -> None:
            if not hasattr(self, "store"):
                return
            listed = self.pending.pending_ids("default")
            assert len(listed) == len(set(listed)), "a job twice in the pending list"
            dispatched = set(self.pending.dispatched("default"))
            heads = {m.decode() for o in ("alice", "bob") for m in self.store.redis.zrange(f"trainq:pending:default:owner:{o}", 0, -1)}
            assert set(listed) == heads
            assert not set(listed) & dispatched
            for job_id in self.jobs:
                state = self.store.get(job_id).state
                if state in STARTABLE_STATES:
                    assert (job_id in listed) != (job_id in dispatched), (job_id, state)
                else:
                    assert job_id not in listed and job_id not in dispatched, (job_id, state)
                assert (state is JobState.RUNNING) == (job_id in self.runs)

    Scheduling.TestCase.settings = hsettings(
        max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
    )
    Scheduling.TestCase().runTest()
