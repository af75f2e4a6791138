"""The HTTP API over real HTTP (uvicorn) with real Redis and Celery: validation, reads, listing."""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures import example_spec


def locs(response: httpx.Response) -> list[list]:
    assert response.status_code == 422, response.text
    return [error["loc"] for error in response.json()["detail"]]


def test_healthz_and_openapi(api: httpx.Client):
    assert api.get("/healthz").json() == {"status": "ok"}
    schema = api.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/healthz", "/readyz", "/jobs/{job_id}/logs", "/jobs/{job_id}/artifacts",
            "/workers", "/queues", "/metrics"} <= set(schema["paths"])
    assert api.get("/docs").status_code == 200
    paths = schema["paths"]
    assert {"404", "409", "422", "503"} <= set(paths["/jobs/{job_id}/cancel"]["post"]["responses"])
    assert {"409", "422", "503"} <= set(paths["/jobs"]["post"]["responses"])
    assert {"404", "422", "503"} <= set(paths["/jobs/{job_id}"]["get"]["responses"])
    assert {"404", "422"} <= set(paths["/jobs/{job_id}/logs"]["get"]["responses"])


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda s: s.update(epochs="ten"), ["body", "epochs"]),
        (lambda s: s.update(learnig_rate=0.1), ["body", "learnig_rate"]),
        (lambda s: s["optimizer"].update(learnig_rate=0.1), ["body", "optimizer", "learnig_rate"]),
        (lambda s: s["optimizer"].update(lr=-1), ["body", "optimizer", "lr"]),
        (lambda s: s["dataset"].update(image_size=100000), ["body", "dataset", "image_size"]),
        (lambda s: s.pop("dataset"), ["body", "dataset"]),
        (lambda s: s.update(epochs=True), ["body", "epochs"]),
        (lambda s: s.update(epochs="3"), ["body", "epochs"]),
        (lambda s: s["model"].update(arch="vit_b_16"), ["body", "model"]),  # needs dataset.image_size 224
        (lambda s: s["checkpoint"].update(every_steps=10**26), ["body", "checkpoint", "every_steps"]),
    ],
)
def test_bad_spec_is_422_naming_the_field(api: httpx.Client, mutate, loc):
    spec = example_spec()
    mutate(spec)
    assert loc in locs(api.post("/jobs", json=spec))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", '"NaN"'])
def test_non_finite_lr_is_422_not_500(api: httpx.Client, token: str):
    # A bare NaN token is not JSON but Python's parser takes it; FastAPI then used to 500 while
    # echoing it back (fastapi/fastapi#4589).
    body = '{"dataset": {"uri": "s3://trainq/datasets/digits/"}, "optimizer": {"lr": %s}}' % token
    response = api.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert ["body", "optimizer", "lr"] in locs(response)
    assert api.get("/jobs").status_code == 200


def test_malformed_json_is_422(api: httpx.Client):
    response = api.post("/jobs", content="{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_unknown_job_is_404(api: httpx.Client):
    response = api.get("/jobs/does-not-exist")
    assert response.status_code == 404
    assert "does-not-exist" in response.json()["detail"]


def test_list_is_newest_first_and_paginated(api: httpx.Client):
    # Specs on a queue no worker consumes: recorded and enqueued, never run.
    spec = example_spec() | {"queue": "test-nobody-listens"}
    ids = [api.post("/jobs", json=spec).raise_for_status().json()["id"] for _ in range(3)]
    page = api.get("/jobs", params={"limit": 2}).json()
    assert page["count"] >= 3 and page["next_cursor"]
    assert [job["id"] for job in page["data"]] == ids[::-1][:2]
    second = api.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert second["data"][0]["id"] == ids[0]
    assert api.get("/jobs", params={"limit": 0}).status_code == 422


def test_submit_returns_202_with_a_queued_record(api: httpx.Client):
    spec = example_spec() | {"queue": "test-nobody-listens"}
    response = api.post("/jobs", json=spec)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] == "queued" and job["queue"] == "test-nobody-listens"
    assert [t["state"] for t in job["transitions"]] == ["queued"]
    assert api.get(f"/jobs/{job['id']}").json()["spec"] == job["spec"]


def test_huge_inputs_are_refused_briefly(api: httpx.Client):
    spec = example_spec() | {"name": "x" * 100_000}
    response = api.post("/jobs", json=spec)
    assert ["body", "name"] in locs(response) and len(response.content) < 2_000
    big = api.post("/jobs", content=b"{" + b" " * (2 * 1024 * 1024) + b"}", headers={"content-type": "application/json"})
    assert big.status_code == 413
    assert api.get("/jobs", params={"limit": 10**20}).status_code == 422


@pytest.mark.parametrize(
    ("mutate", "loc", "message"),
    [
        (lambda s: s.update(dataset={"type": "csv", "uri": "s3://trainq/t.csv", "target": "y", "task": "regression"},
                            model={"arch": "mlp"}, loss={"name": "cross_entropy"}), ["body", "loss"], "regression"),
        (lambda s: s.update(dataset={"type": "csv", "uri": "s3://trainq/t.csv", "target": "y", "task": "regression"}),
         ["body", "model"], "csv"),
        (lambda s: s["dataset"].update(train_transforms=[{"name": "rotate"}]), ["body", "dataset", "train_transforms", 0], "rotate"),
        (lambda s: s["dataset"].update(train_transforms=[{"name": "random_crop", "size": 0}]),
         ["body", "dataset", "train_transforms", 0, "size"], "greater than or equal to 1"),
        (lambda s: s.update(optimizer={"name": "sgd", "nesterov": True}), ["body", "optimizer"], "nesterov"),
        (lambda s: s.update(optimizer={"name": "sgd", "lr": 0.1, "momentun": 0.9}), ["body", "optimizer", "momentun"], "Extra"),
        (lambda s: s["model"].update(pretrained=True), ["body", "model"], "cannot be downloaded"),
        (lambda s: s.update(checkpoint={"best_metric": "val_r2"}), ["body", "checkpoint"], "classification"),
        (lambda s: s.update(lr_schedule={"name": "one_cycle"}), ["body", "lr_schedule", "max_lr"], "Field required"),
        (lambda s: s.update(loss={"name": "cross_entropy", "class_weights": [1.0, 2.0]}), ["body", "loss"], "num_classes is 10"),
        (lambda s: s.update(batch_size=1), ["body", "batch_size"], "its BatchNorm layers need at least 2 samples per batch"),
        (lambda s: s.update(drop_last="yes"), ["body", "drop_last"], 'drop_last must be "auto", true or false'),
    ],
)
def test_inconsistent_or_unknown_recipes_are_422_naming_the_field(api: httpx.Client, mutate, loc, message):
    spec = example_spec()
    mutate(spec)
    response = api.post("/jobs", json=spec)
    errors = {tuple(error["loc"]): error["msg"] for error in response.json()["detail"]}
    assert response.status_code == 422 and tuple(loc) in errors, errors
    assert message in errors[tuple(loc)]


def test_dry_run_reports_data_and_model_and_queues_nothing(api: httpx.Client):
    before = api.get("/jobs").json()["count"]
    response = api.post("/jobs", params={"dry_run": "true"}, json=example_spec())
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["task"] == "classification" and report["classes"] == [str(d) for d in range(10)]
    assert sum(report["counts"].values()) == 1438 and report["num_val"] == 359  # 1,797 images, 20% held out
    assert report["input_shape"] == [1, 8, 8] and report["num_outputs"] == 10
    assert report["batch_shape"] == [32, 1, 8, 8] and report["last_batch_size"] == 1438 % 32
    assert report["steps_per_epoch"] == 45 and report["parameters"] > 10_000
    assert 1.0 < report["loss"] < 4.0  # random init: about ln(10) = 2.3
    assert api.get("/jobs").json()["count"] == before


@pytest.mark.parametrize(
    ("mutate", "loc", "message"),
    [
        (lambda s: s["dataset"].update(uri="s3://trainq/datasets/nothing-here/"), ["body", "dataset", "uri"],
         "s3://trainq/datasets/nothing-here/ is empty"),
        (lambda s: s["model"].update(num_classes=7), ["body", "model", "num_classes"], "model.num_classes is 7 but"),
        (lambda s: s.update(batch_size=5000), ["body", "batch_size"], "batch_size 5000 is larger than the 1438 training samples"),
        (lambda s: s.update(model={"arch": "alexnet"}, dataset=s["dataset"] | {"channels": 3}), ["body", "dataset", "image_size"],
         "cannot take 3x8x8 images"),
    ],
)
def test_dry_run_names_what_would_fail(api: httpx.Client, mutate, loc, message):
    spec = example_spec()
    mutate(spec)
    response = api.post("/jobs", params={"dry_run": "true"}, json=spec)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]  # the shape of a validation error
    assert error["loc"] == loc and message in error["msg"] and error["type"] in {"job_error", "dataset_error"}


def test_dry_run_of_a_csv_regression(api: httpx.Client, storage, tmp_path):
    from trainq.sample_data import write_table

    write_table(tmp_path / "diabetes.csv", "diabetes")
    uri = storage.upload_file(tmp_path / "diabetes.csv", "s3://trainq/tables/dry-diabetes.csv")
    spec = {"dataset": {"type": "csv", "uri": uri, "target": "target", "task": "regression"}, "model": {"arch": "mlp"}}
    report = api.post("/jobs", params={"dry_run": "true"}, json=spec).raise_for_status().json()
    assert report["task"] == "regression" and report["classes"] == []
    assert report["counts"] == {"rows": 442 - round(442 * 0.2)} and report["input_shape"] == [10]
    missing = api.post("/jobs", params={"dry_run": "true"}, json=spec | {"dataset": spec["dataset"] | {"target": "y"}})
    assert missing.status_code == 422
    [error] = missing.json()["detail"]
    assert error["loc"] == ["body", "dataset", "target"] and "no column 'y' (dataset.target)" in error["msg"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(epoch=3), "epoch: Extra inputs are not permitted; did you mean `epochs`?"),
        (lambda s: s["optimizer"].update(learning_rate=0.1), "learning_rate: Extra inputs are not permitted; did you mean `lr`?"),
        (lambda s: s["optimizer"].update(learnig_rate=0.1), "learnig_rate: Extra inputs are not permitted; did you mean `lr`?"),
        (lambda s: s["dataset"].update(imagesize=8), "imagesize: Extra inputs are not permitted; did you mean `image_size`?"),
        (lambda s: s.update(checkpoint={"every_step": 5}), "every_step: Extra inputs are not permitted; did you mean `every_steps`?"),
        (lambda s: s.update(colour="red"), "colour: Extra inputs are not permitted"),  # nothing close: no guess
    ],
)
def test_an_unknown_key_gets_the_closest_name_at_its_place(api: httpx.Client, mutate, message):
    spec = example_spec()
    mutate(spec)
    response = api.post("/jobs", json=spec)
    found = [f"{error['loc'][-1]}: {error['msg']}" for error in response.json()["detail"]]
    assert response.status_code == 422 and found == [message], found


def test_an_unknown_query_parameter_gets_the_closest_name(api: httpx.Client):
    response = api.get("/jobs", params={"stat": "running"})
    assert response.status_code == 422
    assert [error["msg"] for error in response.json()["detail"]] == ["Extra inputs are not permitted; did you mean `state`?"]


def test_a_unique_prefix_of_an_id_names_the_job(api: httpx.Client):
    job = api.post("/jobs", json=example_spec() | {"queue": "test-nobody-listens"}).json()
    short = job["id"][:6]
    assert api.get(f"/jobs/{short}").json()["id"] == job["id"]
    assert api.get(f"/jobs/{job['id'][:10].upper()}").json()["id"] == job["id"]
    assert api.get(f"/jobs/{short}/artifacts").json()["job_id"] == job["id"]
    assert api.get(f"/jobs/{short}/logs").status_code == 200
    assert api.post(f"/jobs/{short}/cancel").json()["id"] == job["id"]
    assert api.get(f"/jobs/{job['id']}").json()["state"] == "cancelled"
    # Shorter than 6 is not a prefix; a prefix nobody has is a 404 like an unknown id.
    assert api.get(f"/jobs/{job['id'][:5]}").status_code == 404
    assert api.get(f"/jobs/{'f' * 31 if not job['id'].startswith('f' * 31) else '0' * 31}").status_code == 404


def test_an_ambiguous_prefix_is_422_listing_the_matches(stack, api: httpx.Client, api_token: str):
    import redis

    from shared.jobs import OWNER_INDEX_KEY

    owner = "short-ids"
    ids = ["abcdef01" + "0" * 24, "abcdef02" + "0" * 24]
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    client.zadd(OWNER_INDEX_KEY.format(owner), {job_id: 1.0 for job_id in ids})
    headers = {"Authorization": f"Bearer {stack.create_token(owner)}"}
    response = api.get("/jobs/abcdef0", headers=headers)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["path", "job_id"] and f"matches 2 jobs ({ids[0]}, {ids[1]}); give more characters" in error["msg"]
    # Another owner's ids are not matched (nor listed): for `tester` the same prefix is nothing.
    assert api.get("/jobs/abcdef0").status_code == 404
    client.delete(OWNER_INDEX_KEY.format(owner))
    client.close()
