"""The parts of a training recipe a spec names: loss, optimizer, LR schedule, best-metric tracking.

Each builder turns a spec section into the torch object; nothing here runs the loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from shared.spec import HIGHER_IS_BETTER, JobSpec

#: Linear warmup starts at this fraction of the lr.
WARMUP_START_FACTOR = 0.01


class _OneHotBCE(nn.Module):
    """``BCEWithLogitsLoss`` on logits ``(batch, classes)`` against class indices ``(batch,)``."""

    def __init__(self, num_classes: int, pos_weight: float | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        weight = torch.full((num_classes,), pos_weight) if pos_weight is not None else None
        self.loss = nn.BCEWithLogitsLoss(pos_weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, nn.functional.one_hot(target, self.num_classes).to(logits.dtype))


def build_loss(spec: JobSpec, num_outputs: int) -> nn.Module:
    """The loss module for ``spec.loss``: outputs ``(batch, num_outputs)`` and targets → a scalar.

    Raises:
        ValueError: ``class_weights`` has a length other than ``num_outputs`` (JobFailure upstream).
    """
    loss = spec.loss
    match loss.name:
        case "cross_entropy":
            weight = None
            if loss.class_weights is not None:
                if len(loss.class_weights) != num_outputs:
                    raise ValueError(f"loss.class_weights has {len(loss.class_weights)} values for {num_outputs} classes")
                weight = torch.tensor(loss.class_weights, dtype=torch.float32)
            return nn.CrossEntropyLoss(weight=weight, label_smoothing=loss.label_smoothing)
        case "bce_with_logits":
            return _OneHotBCE(num_outputs, loss.pos_weight)
        case "mse":
            return nn.MSELoss()
        case "l1":
            return nn.L1Loss()
        case "smooth_l1":
            return nn.SmoothL1Loss(beta=loss.beta)
        case "huber":
            return nn.HuberLoss(delta=loss.delta)
    raise ValueError(f"unknown loss {loss.name!r}")  # unreachable: the spec lists them all


def build_optimizer(spec: JobSpec, params: Any) -> torch.optim.Optimizer:
    """``torch.optim.Adam``, ``AdamW`` or ``SGD`` as ``spec.optimizer`` says."""
    opt = spec.optimizer
    match opt.name:
        case "adam":
            return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        case "adamw":
            return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        case "sgd":
            return torch.optim.SGD(
                params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
            )
    raise ValueError(f"unknown optimizer {opt.name!r}")  # unreachable


def build_scheduler(
    spec: JobSpec, optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int
) -> LRScheduler | None:
    """The LR schedule of ``spec.lr_schedule``, stepped once per optimizer step (None: constant lr).

    ``warmup_steps`` prepends ``LinearLR`` from ``WARMUP_START_FACTOR`` × lr to lr.
    """
    schedule = spec.lr_schedule
    if schedule is None:
        return None
    warmup = min(getattr(schedule, "warmup_steps", 0), max(total_steps - 1, 0))
    match schedule.name:
        case "warmup":
            return LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup or 1)
        case "one_cycle":
            return OneCycleLR(optimizer, max_lr=schedule.max_lr, total_steps=max(total_steps, 2), pct_start=schedule.pct_start)
        case "step":
            main: LRScheduler = StepLR(optimizer, step_size=schedule.step_epochs * steps_per_epoch, gamma=schedule.gamma)
        case "cosine":
            main = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1), eta_min=schedule.min_lr)
        case _:
            raise ValueError(f"unknown lr_schedule {schedule.name!r}")  # unreachable
    if not warmup:
        return main
    ramp = LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class MetricTracker:
    """Best value of a validation metric, and epochs since it last improved by ``min_delta``.

    Direction from :data:`shared.spec.HIGHER_IS_BETTER` (``val_loss`` lower, ``val_accuracy``
    higher…). Its state goes into every checkpoint, so early stopping survives a resume.
    """

    def __init__(self, metric: str, min_delta: float = 0.0) -> None:
        self.metric, self.min_delta = metric, min_delta
        self.higher = HIGHER_IS_BETTER[metric]
        self.best: float | None = None
        self.stale_epochs = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record an epoch's metrics; True if ``metric`` improved on the best so far.

        A NaN or infinite value is never an improvement (nor the best): it counts as a stale epoch.
        """
        value = metrics[self.metric]
        if not math.isfinite(value):
            self.stale_epochs += 1
            return False
        gain = None if self.best is None else (value - self.best if self.higher else self.best - value)
        if gain is None or gain > self.min_delta:
            self.best, self.stale_epochs = value, 0
            return True
        self.stale_epochs += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain values, weights_only-safe."""
        return {"metric": self.metric, "best": self.best, "stale_epochs": self.stale_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.stale_epochs = state["best"], state["stale_epochs"]
