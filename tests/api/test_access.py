"""Submit-time confinement over real HTTP: a spec names only configured queues and allowed prefixes."""

from __future__ import annotations

import httpx
import pytest
import redis

from tests.fixtures import example_spec, with_dataset


def errors(response: httpx.Response) -> dict[tuple, str]:
    assert response.status_code == 422, response.text
    return {tuple(error["loc"]): error["msg"] for error in response.json()["detail"]}


@pytest.mark.parametrize("queue", ["unacked", "unacked_index", "celeryev", "nobody-configured-this"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_queue_the_operator_did_not_configure_is_422_and_nothing_is_queued(api: httpx.Client, stack, queue: str, dry_run: bool):
    # Issue 7: `"queue": "unacked"` made a list at kombu's key; the next job killed the worker
    # with WRONGTYPE and was lost.
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    before = api.get("/jobs").json()["count"]
    response = api.post("/jobs", params={"dry_run": str(dry_run).lower()}, json=example_spec() | {"queue": queue})
    message = errors(response)[("body", "queue")]
    assert f"queue {queue!r} is not one of the configured queues ['default', 'test-nobody-listens', 'ddp']" in message
    assert api.get("/jobs").json()["count"] == before  # not recorded, so not lost either
    assert client.type(queue) in (b"none", b"hash")  # kombu's own `unacked` hash, never a list of ours


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda s: with_dataset(s, uri="s3://another-team/datasets/x/"), ("body", "dataset", "uri")),
        (lambda s: with_dataset(s, extra_uris=["s3://trainq/datasets/ok/", "s3://trainq/jobs/x/"]), ("body", "dataset", "extra_uris", 1)),
        (lambda s: with_dataset(s, val_uri="s3://trainq/private/val/"), ("body", "dataset", "val_uri")),
        (lambda s: s | {"model": {"arch": "small_cnn", "weights_uri": "s3://trainq/jobs/abc/checkpoints/final.pt"}}, ("body", "model", "weights_uri")),
        (lambda s: with_dataset(s, uri="s3://trainq/datasets/../jobs/"), ("body", "dataset", "uri")),
    ],
)
def test_a_uri_outside_the_allowed_prefixes_is_422_naming_the_field(api: httpx.Client, mutate, loc):
    spec = mutate(example_spec())
    for params in ({}, {"dry_run": "true"}):
        found = errors(api.post("/jobs", params=params, json=spec))
        assert list(found) == [loc], found
        assert "is not under a prefix this service may read" in found[loc] or "'..' segment" in found[loc]


def test_the_allowed_weights_prefix_is_accepted(api: httpx.Client):
    spec = example_spec() | {"model": {"arch": "small_cnn", "weights_uri": "s3://trainq/weights/cnn.pt"}, "queue": "test-nobody-listens"}
    assert api.post("/jobs", json=spec).status_code == 202


def test_an_owners_own_prefix_is_readable_by_that_owner_only(api: httpx.Client, stack, storage, tmp_path):
    # DATA_URIS_ALLOWED_BY_OWNER (issue 7 item 4, per owner): the session stack opens
    # s3://trainq/teams/tester/ to the `api` fixture's owner only.
    from trainq.sample_data import write_digits

    write_digits(tmp_path, limit=60)
    uri = "s3://trainq/teams/tester/digits/"
    storage.upload_dir(tmp_path, uri)
    spec = with_dataset(example_spec() | {"batch_size": 8, "epochs": 1}, uri=uri)
    # The dry run runs on a worker, whose own check must also see the owner's prefix.
    response = api.post("/jobs", params={"dry_run": "true"}, json=spec)
    assert response.status_code == 200, response.text
    other = stack.create_token("someone-else")
    response = api.post("/jobs", params={"dry_run": "true"}, json=spec, headers={"Authorization": f"Bearer {other}"})
    assert "is not under a prefix this service may read" in errors(response)[("body", "dataset", "uri")]
