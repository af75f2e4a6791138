"""The spec alone (no servers): what it accepts, what it refuses and where it says the fault is."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from shared.spec import JobSpec, json_path
from tests.fixtures import example_spec


def error_locs(spec: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec)
    return [tuple(json_path(error["loc"], spec)) for error in info.value.errors()]


def test_example_spec_is_valid_and_round_trips():
    spec = JobSpec.model_validate(example_spec())
    assert spec.dataset.uri == "s3://trainq/datasets/digits/"
    assert spec.optimizer.betas == (0.9, 0.999)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_defaults_fill_a_minimal_spec():
    spec = JobSpec.model_validate({"dataset": {"uri": "s3://bucket/data/"}})
    assert (spec.model.arch, spec.loss.name, spec.optimizer.name) == ("small_cnn", "cross_entropy", "adam")
    assert spec.optimizer.lr == 1e-3 and spec.epochs == 10 and spec.checkpoint.every_epochs == 1


@pytest.mark.parametrize(
    ("path", "value", "loc"),
    [
        (("epochs",), "ten", ("epochs",)),
        (("batch_size",), 0, ("batch_size",)),
        (("optimizer", "lr"), -0.1, ("optimizer", "lr")),
        (("optimizer", "lr"), math.nan, ("optimizer", "lr")),
        (("optimizer", "lr"), "Infinity", ("optimizer", "lr")),
        (("optimizer", "betas"), [0.9], ("optimizer", "betas", 1)),
        (("dataset", "uri"), "/local/path", ("dataset", "uri")),
        (("dataset", "val_fraction"), 1.0, ("dataset", "val_fraction")),
        (("model", "arch"), "resnet9000", ("model", "arch")),
        (("queue",), "bad queue!", ("queue",)),
    ],
)
def test_bad_values_name_their_field(path, value, loc):
    spec = example_spec()
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert loc in error_locs(spec)


@pytest.mark.parametrize(
    ("section", "loc"),
    [(None, ("learnig_rate",)), ("optimizer", ("optimizer", "learnig_rate")), ("dataset", ("dataset", "learnig_rate"))],
)
def test_unknown_keys_are_refused_at_every_level(section, loc):
    spec = example_spec()
    (spec[section] if section else spec)["learnig_rate"] = 0.1
    assert error_locs(spec) == [loc]


def test_vit_needs_224_pixel_images():
    spec = example_spec()
    spec["model"]["arch"] = "vit_b_16"
    with pytest.raises(ValidationError, match="set dataset.image_size to 224"):
        JobSpec.model_validate(spec)


def test_batch_size_1_is_refused_for_batchnorm_models_only():
    spec = example_spec()  # small_cnn: BatchNorm
    spec["batch_size"] = 1
    assert error_locs(spec) == [("batch_size",)]
    spec["model"]["arch"] = "vgg11"  # no BatchNorm
    assert JobSpec.model_validate(spec).batch_size == 1
    assert JobSpec.model_validate(example_spec()).drop_last == "auto"
    for value in (True, False, "auto"):
        assert JobSpec.model_validate(example_spec() | {"drop_last": value}).drop_last == value
    assert set(error_locs(example_spec() | {"drop_last": 1})) == {("drop_last",)}  # strict: 1 is not true


@pytest.mark.parametrize(
    ("uri", "ok"),
    [("local://diabetes.csv", True), ("local://tables/diabetes.csv", True), ("s3://trainq/t.csv", True),
     ("local://tables/", False), ("s3://trainq", False), ("s3://trainq/", False)],
)
def test_a_csv_uri_names_a_file_even_at_the_top_of_data_root(uri: str, ok: bool):
    spec = {"dataset": {"type": "csv", "uri": uri, "target": "y", "task": "regression"}}
    if ok:
        assert JobSpec.model_validate(spec).dataset.uri == uri
    else:
        assert ("dataset", "uri") in error_locs(spec)
