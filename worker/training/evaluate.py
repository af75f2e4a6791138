"""Validation: the metrics of a model over a loader, in eval mode."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from shared.exceptions import Interrupted
from shared.storage import ShouldStop
from worker.faults import in_stage
from worker.training.fastpath import FastPath


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
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct, top5, |err|, err²
    targets_all = []
    count = 0
    fast = fast or FastPath(device)
    for inputs, targets in loader:
        if should_stop is not None and (reason := should_stop()):
            raise Interrupted(reason)
        inputs, targets = fast.to_device(inputs, targets)
        with fast.autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        total_loss += loss.double() * targets.shape[0]
        if task == "classification":
            sums[0] += (outputs.argmax(dim=1) == targets).sum()
            if outputs.shape[1] > 5:
                sums[1] += (outputs.topk(5, dim=1).indices == targets[:, None]).any(dim=1).sum()
        else:
            error = (outputs - targets).double()
            sums[2] += error.abs().sum()
            sums[3] += (error**2).sum()
            targets_all.append(targets.double())
        count += targets.shape[0]
    model.train()
    # .tolist() is a sync point: once per evaluation, not per batch.
    loss, (correct, top5, abs_error, sq_error) = total_loss.item() / count, sums.tolist()
    if task == "classification":
        metrics = {"val_loss": loss, "val_accuracy": correct / count}
        if top5:
            metrics["val_top5_accuracy"] = top5 / count
        return metrics
    target = torch.cat(targets_all)
    total_variance = ((target - target.mean()) ** 2).sum().item()
    return {
        "val_loss": loss,
        "val_mae": abs_error / count / target.shape[1],
        "val_rmse": (sq_error / count / target.shape[1]) ** 0.5,
        "val_r2": 1.0 - sq_error / total_variance if total_variance > 0 else float("nan"),
    }
