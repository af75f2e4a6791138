"""Losses, optimizers, LR schedules, transforms and metric tracking built from spec sections."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from shared.spec import JobSpec
from worker.training.transforms import build_transform
from worker.training.recipe import WARMUP_START_FACTOR, MetricTracker, build_loss, build_optimizer, build_scheduler

IMAGES = {"dataset": {"uri": "s3://trainq/d/"}}
TABLE = {"dataset": {"type": "csv", "uri": "s3://trainq/t.csv", "target": "y", "task": "regression"}}


def spec(base: dict, **fields) -> JobSpec:
    return JobSpec.model_validate(base | fields)


@pytest.mark.parametrize(
    ("base", "loss", "reference"),
    [
        (IMAGES, {"name": "cross_entropy", "label_smoothing": 0.1}, lambda o, t: nn.functional.cross_entropy(o, t, label_smoothing=0.1)),
        (IMAGES, {"name": "cross_entropy", "class_weights": [1.0, 2.0, 3.0]},
         lambda o, t: nn.functional.cross_entropy(o, t, weight=torch.tensor([1.0, 2.0, 3.0]))),
        (IMAGES, {"name": "bce_with_logits"}, lambda o, t: nn.functional.binary_cross_entropy_with_logits(o, nn.functional.one_hot(t, 3).float())),
        (TABLE, {"name": "mse"}, nn.functional.mse_loss),
        (TABLE, {"name": "l1"}, nn.functional.l1_loss),
        (TABLE, {"name": "smooth_l1", "beta": 0.5}, lambda o, t: nn.functional.smooth_l1_loss(o, t, beta=0.5)),
        (TABLE, {"name": "huber", "delta": 2.0}, lambda o, t: nn.functional.huber_loss(o, t, delta=2.0)),
    ],
)
def test_losses_match_torch(base, loss, reference):
    torch.manual_seed(0)
    classification = base is IMAGES
    outputs = torch.randn(6, 3 if classification else 1) * 3
    targets = torch.randint(0, 3, (6,)) if classification else torch.randn(6, 1) * 3
    built = build_loss(spec(base, loss=loss), num_outputs=3 if classification else 1)
    assert torch.allclose(built(outputs, targets), reference(outputs, targets))


def test_class_weights_must_match_the_classes_found():
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        build_loss(spec(IMAGES, loss={"name": "cross_entropy", "class_weights": [1.0, 1.0, 1.0]}), num_outputs=4)


def lrs(job: JobSpec, total: int, per_epoch: int = 10) -> list[float]:
    optimizer = build_optimizer(job, [nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(job, optimizer, total_steps=total, steps_per_epoch=per_epoch)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_schedules_follow_their_formulas():
    cosine = lrs(spec(IMAGES, optimizer={"lr": 0.1}, lr_schedule={"name": "cosine", "warmup_steps": 10, "min_lr": 0.0}), 110)
    assert cosine[0] == pytest.approx(0.1 * WARMUP_START_FACTOR) and cosine[10] == pytest.approx(0.1)
    assert cosine[60] == pytest.approx(0.05, rel=1e-6) and cosine[-1] < 0.001  # half-way down the cosine
    step = lrs(spec(IMAGES, optimizer={"lr": 0.1}, lr_schedule={"name": "step", "step_epochs": 2, "gamma": 0.5}), 50)
    assert (step[19], step[20], step[40]) == pytest.approx((0.1, 0.05, 0.025))
    one_cycle = lrs(spec(IMAGES, lr_schedule={"name": "one_cycle", "max_lr": 1.0, "pct_start": 0.25}), 100)
    assert max(one_cycle) == pytest.approx(1.0, rel=1e-3) and one_cycle.index(max(one_cycle)) in (24, 25)
    warmup = lrs(spec(IMAGES, optimizer={"lr": 0.2}, lr_schedule={"name": "warmup", "warmup_steps": 4}), 8)
    assert warmup[4:] == pytest.approx([0.2] * 4) and warmup[0] == pytest.approx(0.002)


def test_optimizers_are_the_ones_named():
    params = [nn.Parameter(torch.zeros(1))]
    sgd = build_optimizer(spec(IMAGES, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}), params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(spec(IMAGES, optimizer={"name": "adamw"}), params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01


def test_every_transform_runs_and_ends_at_image_size():
    dataset = JobSpec.model_validate(
        {"dataset": {"uri": "s3://trainq/d/", "image_size": 24, "normalize": {"preset": "imagenet"}, "train_transforms": [
            {"name": "resize", "size": 40}, {"name": "center_crop", "size": 36}, {"name": "random_crop", "size": 32, "padding": 2},
            {"name": "random_resized_crop", "size": 28, "scale": [0.5, 1.0]}, {"name": "horizontal_flip", "p": 1.0},
            {"name": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1},
        ]}}
    ).dataset
    image = Image.new("RGB", (50, 60), (120, 60, 200))
    out = build_transform(dataset.train_transforms, dataset)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    plain = build_transform([], dataset)(image)  # eval default: resize and normalize only
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert plain[0, 0, 0].item() == pytest.approx((120 / 255 - mean[0]) / std[0], abs=1e-2)


def test_metric_tracker_direction_and_patience():
    accuracy = MetricTracker("val_accuracy", min_delta=0.01)
    assert accuracy.update({"val_accuracy": 0.5}) and not accuracy.update({"val_accuracy": 0.505})
    assert accuracy.stale_epochs == 1 and accuracy.update({"val_accuracy": 0.6}) and accuracy.stale_epochs == 0
    loss = MetricTracker("val_loss")
    assert loss.update({"val_loss": 1.0}) and loss.update({"val_loss": 0.5}) and not loss.update({"val_loss": 0.7})
    restored = MetricTracker("val_loss")
    restored.load_state_dict(loss.state_dict())
    assert (restored.best, restored.stale_epochs) == (0.5, 1) and not math.isnan(restored.best)


def test_metric_tracker_ignores_non_finite_values():
    loss = MetricTracker("val_loss")
    assert loss.update({"val_loss": 1.0})
    for bad in (float("nan"), float("inf"), float("-inf")):  # -inf would be a perfect loss
        assert not loss.update({"val_loss": bad})
    assert loss.best == 1.0 and loss.stale_epochs == 3
    first = MetricTracker("val_r2")
    assert not first.update({"val_r2": float("nan")}) and first.best is None
