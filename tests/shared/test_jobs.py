"""Job records on a real Redis: create, read, list, the lifecycle's legal and illegal moves."""

from __future__ import annotations

import pytest
import redis

from shared.exceptions import InvalidTransitionError, JobNotFoundError
from shared.jobs import JobState, JobStore, Progress
from shared.spec import JobSpec
from tests.fixtures import example_spec


@pytest.fixture
def store(stack) -> JobStore:
    client = redis.Redis.from_url(stack.env["REDIS_URL"].rsplit("/", 1)[0] + "/3")  # a db of its own
    client.flushdb()
    return JobStore(client)


def test_create_get_and_list_newest_first(store: JobStore):
    spec = JobSpec.model_validate(example_spec())
    (first, _), (second, _) = store.create(spec, "default"), store.create(spec, "gpu")
    assert store.get(first.id) == first
    records, count = store.list(limit=10)
    assert count == 2 and [r.id for r in records] == [second.id, first.id]
    assert records[0].queue == "gpu" and records[0].name == spec.name and not hasattr(records[0], "spec")


def test_lifecycle_is_enforced_and_timestamped(store: JobStore):
    job, _ = store.create(JobSpec.model_validate(example_spec()), "default")
    running = store.transition(job.id, JobState.RUNNING, worker="w1")
    assert running.worker == "w1" and running.started_at >= job.created_at
    store.update(job.id, progress=Progress(step=3, epochs=10))
    assert store.get(job.id).progress.step == 3
    done = store.transition(job.id, JobState.SUCCEEDED)
    assert [t.state for t in done.transitions] == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert done.finished_at >= done.started_at
    with pytest.raises(InvalidTransitionError, match="succeeded; it cannot become running"):
        store.transition(job.id, JobState.RUNNING)
    with pytest.raises(InvalidTransitionError):
        store.transition(store.create(job.spec, "default")[0].id, JobState.SUCCEEDED)


def test_unknown_jobs_raise_and_updates_never_create_records(store: JobStore):
    with pytest.raises(JobNotFoundError):
        store.get("nope")
    with pytest.raises(JobNotFoundError):
        store.update("nope", device="cpu")
    with pytest.raises(JobNotFoundError):
        store.transition("nope", JobState.RUNNING)
    assert store.redis.dbsize() == 0
