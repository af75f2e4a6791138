"""Validation: the metrics of a model over a loader, in eval mode."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from shared.exceptions import Interrupted
from shared.storage import ShouldStop
from worker.faults import in_stage
from worker.training.fastpath import FastPath
from worker.training.metrics import MetricSums


@in_stage("validation")
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    task: str = "classification",
    fast: FastPath | None = None,
    should_stop: ShouldStop | None = None,
) -> dict[str, float]:
    """Validation metrics of ``model`` over ``loader``, in eval mode.

    Classification: ``val_loss`` (mean per sample), ``val_accuracy`` and, with more than 5
    classes, ``val_top5_accuracy`` (0..1). Regression: ``val_loss``, ``val_mae``, ``val_rmse``
    and ``val_r2`` (coefficient of determination, 1 − SS_res / SS_tot). ``fast``: the run's
    precision, memory format and the data's ``finish`` (default: fp32, as stored, no finish:
    pass ``FastPath(device, finish=data.finish)`` for an image folder's uint8 batches).

    Raises:
        Interrupted: ``should_stop`` (asked before every batch; it must be cheap) answered a reason.
    """
    model.eval()
    sums = MetricSums(task, loss_fn, device)  # whole-set metrics, whatever the batching
    fast = fast or FastPath(device)
    for inputs, targets in loader:
        if should_stop is not None and (reason := should_stop()):
            raise Interrupted(reason)
        inputs, targets = fast.to_device(inputs, targets)
        with fast.autocast():
            sums.add(model(inputs), targets)
    model.train()
    return sums.compute()
