"""What a spec may reach: configured queues and allowed S3 prefixes, checked at submit and in the worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.access import allowed_data_prefixes, check_spec_access, check_uri_allowed, settings_for_owner
from shared.exceptions import JobFailure
from shared.jobs import JobStore
from shared.queue import enqueue, make_celery
from shared.records import FINAL_STATES
from shared.settings import Settings
from shared.spec import JobSpec
from tests.fixtures import example_spec


@pytest.mark.parametrize("queue", ["unacked", "unacked_index", "unacked_mutex", "celeryev", "w1.celery.pidbox"])
def test_a_broker_key_cannot_be_configured_as_a_queue(queue: str):
    with pytest.raises(ValidationError, match=f"queue name '{queue}' is not allowed"):
        Settings(queues=["default", queue])


def test_queues_come_from_the_environment_and_include_the_default(monkeypatch):
    monkeypatch.setenv("QUEUES", "default, gpu")
    assert Settings().queues == ["default", "gpu"]
    monkeypatch.setenv("QUEUES", '["gpu"]')
    monkeypatch.setenv("DEFAULT_QUEUE", "gpu")
    assert Settings().queues == ["gpu"]
    monkeypatch.setenv("QUEUES", "gpu")
    monkeypatch.setenv("DEFAULT_QUEUE", "default")
    with pytest.raises(ValidationError, match="DEFAULT_QUEUE 'default' must be one of QUEUES"):
        Settings()


def test_the_default_allows_the_bucket_s_datasets_tables_and_weights_only():
    settings = Settings(s3_bucket="trainq")
    assert allowed_data_prefixes(settings) == ["s3://trainq/datasets/", "s3://trainq/tables/", "s3://trainq/weights/"]
    for uri in ["s3://trainq/datasets/digits/", "s3://trainq/datasets", "s3://trainq/tables/diabetes.csv",
                "s3://trainq/weights/resnet18.pt", "local://digits/"]:
        check_uri_allowed(uri, settings)
    for uri, message in [
        ("s3://other-team/datasets/x/", "is not under a prefix this service may read"),
        ("s3://trainq/jobs/3f2c/checkpoints/final.pt", "is not under a prefix"),  # another job's artifacts
        ("s3://trainq/datasetsX/", "is not under a prefix"),  # a prefix is a folder
        ("s3://trainq/", "is not under a prefix"),
        ("s3://trainq/datasets/../jobs/x/final.pt", "has a '.' or '..' segment"),
        ("s3://trainq/datasets//etc/", "has an empty segment"),
        ("s3://trainq/datasets/x\x1b[2J/", "control character"),
        ("local://digits/../../etc/", "has a '.' or '..' segment"),  # DATA_ROOT confines it; refused at submit too
    ]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")) as info:
            check_uri_allowed(uri, settings)
        assert "\x1b" not in str(info.value)


def test_allowed_prefixes_are_configurable_and_checked(monkeypatch):
    monkeypatch.setenv("DATA_URIS_ALLOWED", "s3://team-data, s3://trainq/jobs/")
    settings = Settings()
    assert allowed_data_prefixes(settings) == ["s3://team-data/", "s3://trainq/jobs/"]
    check_uri_allowed("s3://team-data/anything/x.csv", settings)
    check_uri_allowed("s3://trainq/jobs/3f2c/checkpoints/final.pt", settings)
    with pytest.raises(ValueError):
        check_uri_allowed("s3://trainq/datasets/digits/", settings)
    with pytest.raises(ValidationError, match="DATA_URIS_ALLOWED"):
        Settings(data_uris_allowed=["s3://trainq/../x/"])


def test_every_uri_of_a_spec_is_checked_naming_its_field():
    spec = JobSpec.model_validate(
        example_spec()
        | {"queue": "gpu"}
        | {"dataset": example_spec()["dataset"] | {"extra_uris": ["s3://trainq/datasets/b/", "s3://x-y/c/"], "val_uri": "s3://x-y/v/"}}
        | {"model": {"arch": "small_cnn", "weights_uri": "s3://trainq/jobs/1/checkpoints/final.pt"}}
    )
    with pytest.raises(JobFailure) as info:
        check_spec_access(spec, Settings())
    message = str(info.value)
    assert message.startswith("queue: queue 'gpu' is not one of the configured queues ['default'] (QUEUES); ")
    assert "dataset.extra_uris[1]: s3://x-y/c/ is not under" in message and "dataset.val_uri: s3://x-y/v/" in message
    assert "model.weights_uri: s3://trainq/jobs/1/checkpoints/final.pt is not under" in message
    assert "dataset.uri" not in message and "extra_uris[0]" not in message


def test_a_job_that_reaches_the_worker_unchecked_fails_once(stack, storage):
    # A job enqueued without the API (or before the settings changed) fails as a job error at
    # once, before the worker downloads anything.
    storage.client.put_object(Bucket="trainq", Key="private/a/1.png", Body=b"x")
    store = JobStore.from_url(stack.env["REDIS_URL"])
    spec = JobSpec.model_validate(example_spec() | {"dataset": example_spec()["dataset"] | {"uri": "s3://trainq/private/"}})
    record, _ = store.create(spec, "default")
    enqueue(make_celery(stack.settings), record.id, "default")
    deadline = time.monotonic() + 60
    while (record := store.get(record.id)).state not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.2)
    assert record.state.value == "failed" and record.attempts == 1, record
    assert record.error.startswith("dataset.uri: s3://trainq/private/ is not under a prefix this service may read")


def test_an_owner_reads_its_own_prefixes_and_no_one_elses(monkeypatch):
    monkeypatch.setenv("DATA_URIS_ALLOWED_BY_OWNER", '{"alice": ["s3://team-a/"], "bob": ["s3://team-b/data"]}')
    settings = Settings(s3_bucket="trainq")
    check_uri_allowed("s3://team-a/x.csv", settings, "alice")
    check_uri_allowed("s3://trainq/datasets/digits/", settings, "bob")  # the shared prefixes stay open
    check_uri_allowed("s3://team-b/data/y.csv", settings, "bob")
    for uri, owner in [("s3://team-a/x.csv", "bob"), ("s3://team-b/data/y.csv", "alice"), ("s3://team-a/x.csv", None)]:
        with pytest.raises(ValueError, match="is not under a prefix this service may read"):
            check_uri_allowed(uri, settings, owner)
    # What the worker hands the engine: alice's view, with no one else's entries left in it.
    engine_settings = settings_for_owner(settings, "alice")
    assert engine_settings.data_uris_allowed_by_owner == {}
    check_uri_allowed("s3://team-a/x.csv", engine_settings)
    with pytest.raises(ValueError):
        check_uri_allowed("s3://team-b/data/y.csv", engine_settings)
    with pytest.raises(ValidationError, match="not s3://<bucket>/<prefix>/"):
        Settings(data_uris_allowed_by_owner={"carol": ["s3://x/../y/"]})


@pytest.mark.parametrize(("root", "cache"), [("data", "data/cache"), ("cache/data", "cache"), ("same", "same")])
def test_data_root_and_the_cache_that_contain_one_another_are_refused_at_start(tmp_path: Path, root: str, cache: str):
    # The cache inside DATA_ROOT made `local://cache/...` read other owners' cached data (issue 17).
    with pytest.raises(ValidationError, match=r"DATA_ROOT \(.*\) and DATA_CACHE_DIR \(.*\) must not contain one another"):
        Settings(data_root=tmp_path / root, data_cache_dir=tmp_path / cache)


def test_a_cache_reached_through_a_symlink_is_refused_too(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "data" / "hidden-cache")
    with pytest.raises(ValidationError, match="must not contain one another"):
        Settings(data_root=tmp_path / "data", data_cache_dir=tmp_path / "cache")
    Settings(data_root=tmp_path / "data", data_cache_dir=tmp_path / "elsewhere")  # side by side is fine


def test_local_folders_are_granted_per_owner_like_s3_prefixes(monkeypatch):
    monkeypatch.setenv("LOCAL_PATHS_ALLOWED", "local://shared/")
    monkeypatch.setenv("DATA_URIS_ALLOWED_BY_OWNER", '{"alice": ["local://alice/", "s3://team-a/"]}')
    settings = Settings()
    check_uri_allowed("local://shared/digits/", settings, "bob")
    check_uri_allowed("local://alice/x.csv", settings, "alice")
    check_uri_allowed("s3://team-a/x.csv", settings, "alice")
    for uri, owner in [("local://alice/x.csv", "bob"), ("local://alice/x.csv", None), ("local://alicex/y", "alice"),
                       ("local://cache/datasets/", "alice")]:
        with pytest.raises(ValueError, match="is not under a folder this service may read"):
            check_uri_allowed(uri, settings, owner)
    engine_settings = settings_for_owner(settings, "alice")  # what the worker checks the spec with
    check_uri_allowed("local://alice/x.csv", engine_settings)
    assert allowed_data_prefixes(engine_settings) == allowed_data_prefixes(settings, "alice")
    assert Settings(local_paths_allowed="").local_paths_allowed == []  # empty: only the owners' own folders
    assert Settings().local_paths_allowed == ["local://shared/"]
    with pytest.raises(ValidationError, match="LOCAL_PATHS_ALLOWED"):
        Settings(local_paths_allowed=["local://a/../b/"])
