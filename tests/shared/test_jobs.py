"""Job records on a real Redis: create, read, list, the lifecycle's legal and illegal moves."""

from __future__ import annotations

import pytest
import redis

from shared.exceptions import InvalidTransitionError, JobNotFoundError
from shared.jobs import JobStore
from shared.records import JobPhase, JobState, Progress
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
    page = store.list(limit=10)
    records, count = page.data, page.count
    assert count == 2 and [r.id for r in records] == [second.id, first.id] and page.next_cursor is None
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


def _hmget_calls(store: JobStore) -> int:
    """HMGET commands the Redis server ran so far (only the list reads summaries with HMGET)."""
    return int(store.redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


@pytest.fixture(scope="module")
def many(stack) -> tuple[JobStore, dict[str, list[str]]]:
    """On a db of its own, read-only for the tests: 1,000 queued jobs of alice on `bulk` (named a, b
    in turn), 3 running on `rare`, 2 of bob; ids newest first."""
    store = JobStore(redis.Redis.from_url(stack.env["REDIS_URL"].rsplit("/", 1)[0] + "/4"))
    store.redis.flushdb()
    spec = JobSpec.model_validate(example_spec())
    ids: dict[str, list[str]] = {"bulk": [], "rare": [], "bob": []}
    for index in range(1000):
        ids["bulk"].append(store.create(spec.model_copy(update={"name": "ab"[index % 2]}), "bulk", owner="alice")[0].id)
    for _ in range(3):
        job = store.create(spec, "rare", owner="alice")[0]
        store.transition(job.id, JobState.RUNNING)
        ids["rare"].append(job.id)
    ids["bob"] = [store.create(spec, "bulk", owner="bob")[0].id for _ in range(2)]
    return store, {key: value[::-1] for key, value in ids.items()}


def test_a_filtered_page_reads_only_what_its_index_holds(many):
    store, many = many
    before = _hmget_calls(store)
    page = store.list(owner="alice", state=JobState.RUNNING, limit=20)
    assert [job.id for job in page.data] == many["rare"] and page.count == 3 and page.next_cursor is None
    assert _hmget_calls(store) - before == 3  # one per running job, none for the 1,000 queued ones
    assert [job.id for job in store.list(queue="rare").data] == many["rare"]
    assert store.list(owner="bob", state=JobState.RUNNING).data == []


def test_cursor_pages_cover_every_job_once_in_order(many):
    store, many = many
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list(owner="alice", state=JobState.QUEUED, limit=150, cursor=cursor)
        assert len(page.data) <= 150 and page.count == 1000
        seen += [job.id for job in page.data]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == many["bulk"] and pages == 7


def test_combined_filters_match(many):
    store, many = many
    page = store.list(owner="alice", queue="bulk", name="a", state=JobState.QUEUED, limit=300)
    assert [job.id for job in page.data] == many["bulk"][1::2][:300]
    assert all(job.name == "a" for job in page.data) and page.count is None and page.next_cursor is not None
    before = _hmget_calls(store)
    assert store.list(owner="alice", queue="bulk", state=JobState.RUNNING).data == []
    assert _hmget_calls(store) - before == 3  # the small side (3 running jobs) drives the page


def test_a_sparse_match_comes_in_short_bounded_pages(store: JobStore):
    spec = JobSpec.model_validate(example_spec())
    special = store.create(spec.model_copy(update={"name": "x"}), "qb")[0].id  # the oldest
    for _ in range(150):
        store.create(spec.model_copy(update={"name": "x"}), "qa")
        store.create(spec.model_copy(update={"name": "y"}), "qb")
    found, cursor, pages = [], None, 0
    while True:
        before = _hmget_calls(store)
        page = store.list(queue="qb", name="x", limit=10, cursor=cursor, max_scanned=50)
        assert _hmget_calls(store) - before <= 50
        found += [job.id for job in page.data]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert found == [special] and pages == 4


def test_transitions_move_jobs_between_state_indexes(store: JobStore):
    job, _ = store.create(JobSpec.model_validate(example_spec()), "default", owner="carol")
    store.transition(job.id, JobState.RUNNING)
    assert [j.id for j in store.list(owner="carol", state=JobState.RUNNING).data] == [job.id]
    store.transition(job.id, JobState.SUCCEEDED)
    assert store.list(owner="carol", state=JobState.RUNNING).data == []
    assert [j.id for j in store.list(state=JobState.SUCCEEDED).data] == [job.id]
    assert store.count_by_state()[JobState.SUCCEEDED] == 1 and store.queues() == ["default"]


@pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_a_succeeded_job_has_no_phase_and_a_stopped_one_keeps_where_it_stopped(store: JobStore, final: JobState):
    job, _ = store.create(JobSpec.model_validate(example_spec()), "default")
    store.transition(job.id, JobState.RUNNING)
    store.update(job.id, progress=Progress(phase=JobPhase.UPLOADING, epoch=3, epochs=3, step=42))
    store.transition(job.id, final)
    progress = store.get(job.id).progress
    assert progress.phase == (None if final is JobState.SUCCEEDED else JobPhase.UPLOADING)
    assert (progress.epoch, progress.step) == (3, 42)


def test_a_new_attempt_clears_the_last_attempts_error_which_stays_in_the_transitions(store: JobStore):
    job, _ = store.create(JobSpec.model_validate(example_spec()), "default")
    store.transition(job.id, JobState.RUNNING)
    store.transition(job.id, JobState.RETRYING, reason="worker lost", error="worker lost: no heartbeat for 30 s")
    assert store.get(job.id).error.startswith("worker lost")
    record = store.transition(job.id, JobState.RUNNING)
    assert record.error is None and record.transitions[-2].reason == "worker lost"
    assert store.transition(job.id, JobState.FAILED, error="time limit").error == "time limit"


def test_rebuild_indexes_restores_the_filter_indexes(store: JobStore):
    job, _ = store.create(JobSpec.model_validate(example_spec()), "gpu", owner="dave")
    for key in store.redis.scan_iter("trainq:jobs:*:*"):
        if b":state:" in key or b":queue:" in key or b":name:" in key:
            store.redis.delete(key)
    assert store.list(state=JobState.QUEUED).data == []
    assert store.rebuild_indexes() == 1
    assert [j.id for j in store.list(owner="dave", queue="gpu", state=JobState.QUEUED).data] == [job.id]


def test_a_bad_cursor_is_a_value_error(store: JobStore):
    with pytest.raises(ValueError, match="not a cursor"):
        store.list(cursor="!!not-base64")


def test_concurrent_submissions_with_one_idempotency_key_record_one_job(store: JobStore):
    # The key, the quota check and the record are one Lua script: no request sees the key
    # claimed before the job it names exists, and none records a second job.
    from concurrent.futures import ThreadPoolExecutor

    spec = JobSpec.model_validate(example_spec())
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.create(spec, "default", owner="erin", idempotency_key="k", max_active=100), range(16)))
    assert len({record.id for record, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert all(record == store.get(record.id) for record, _ in results)
    assert store.list(owner="erin").count == 1


def test_a_refused_submission_writes_nothing_but_its_place_in_the_rate_window(store: JobStore):
    from shared.exceptions import IdempotencyConflictError, QuotaExceededError

    spec = JobSpec.model_validate(example_spec())
    store.create(spec, "default", owner="finn", max_active=1, per_minute=3)
    with pytest.raises(QuotaExceededError, match="MAX_ACTIVE_JOBS_PER_OWNER"):
        store.create(spec, "default", owner="finn", idempotency_key="a", max_active=1, per_minute=3)
    assert store.redis.keys("trainq:idempotency:finn:*") == []  # the key may be used again later
    first, _ = store.create(spec, "default", owner="finn", idempotency_key="b", per_minute=3)
    with pytest.raises(QuotaExceededError, match="SUBMISSIONS_PER_MINUTE") as refused:
        store.create(spec, "default", owner="finn", idempotency_key="b", per_minute=3)
    assert 1 <= refused.value.retry_after_s <= 60
    with pytest.raises(IdempotencyConflictError):
        store.create(spec.model_copy(update={"seed": 7}), "default", owner="finn", idempotency_key="b")
    assert store.list(owner="finn").count == 2 and store.get(first.id).state == JobState.QUEUED


def test_the_pending_job_quota_counts_jobs_waiting_to_start_on_every_queue(store: JobStore):
    from shared.exceptions import QuotaExceededError

    spec = JobSpec.model_validate(example_spec())
    first, _ = store.create(spec, "default", owner="gail", max_pending=2)
    store.create(spec, "gpu", owner="gail", max_pending=2)
    with pytest.raises(QuotaExceededError, match=r"owner 'gail' has 2 jobs waiting to start .*the limit is 2 "
                       r"\(MAX_PENDING_JOBS_PER_OWNER\)"):
        store.create(spec, "cpu", owner="gail", max_pending=2)
    assert store.list(owner="gail").count == 2 and store.redis.keys("trainq:idempotency:*") == []
    store.create(spec, "default", owner="hank", max_pending=2)  # quotas are per owner
    store.transition(first.id, JobState.RUNNING)  # a running job no longer waits
    store.create(spec, "cpu", owner="gail", max_pending=2)
    store.transition(first.id, JobState.PREEMPTED, reason="preempted")  # a preempted one waits again
    with pytest.raises(QuotaExceededError, match="has 3 jobs waiting to start"):
        store.create(spec, "cpu", owner="gail", max_pending=3)
    assert store.list(owner="gail").count == 3


def test_concurrent_submissions_never_exceed_the_pending_job_quota(store: JobStore):
    # The count and the record are one Lua script: no two submits both take the last place.
    from concurrent.futures import ThreadPoolExecutor

    from shared.exceptions import QuotaExceededError

    spec = JobSpec.model_validate(example_spec())

    def submit(index: int) -> bool:
        try:
            store.create(spec, f"queue-{index % 3}", owner="ivy", max_pending=5)
            return True
        except QuotaExceededError:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(submit, range(24))) == 5
    assert store.list(owner="ivy").count == 5
