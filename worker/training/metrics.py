"""Validation metrics of a whole set, whatever its batching: sums over batches, divided once.

A mean of per-batch means depends on the batch size, on the last short batch and on how the
set is split across processes (pytorch/pytorch#61309): with ``loss.class_weights`` a weighted
cross-entropy is Σ w_y·l / Σ w_y over the set, not the mean of each batch's ratio. So every
metric keeps a numerator and a denominator (float64, on the device: no sync per batch); with
several processes the sums are all-reduced before the one division.

What is summed (``N`` samples, ``D`` outputs per sample):

* ``val_loss``: cross-entropy Σ w_y·l_i over Σ w_y (w ≡ 1 without class weights; label smoothing
  as torch weighs it); every other loss (BCE, MSE, L1, smooth L1, Huber) is a mean over the
  N·D elements, so Σ over elements / (N·D).
* ``val_accuracy``, ``val_top5_accuracy`` (more than 5 classes): correct samples / N.
* ``val_mae``, ``val_rmse``: Σ|e| and Σe² over N·D elements; ``val_r2`` = 1 − Σe² / SS_tot, with
  SS_tot = Σy² − (Σy)²/(N·D) around the mean of all target elements.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

# Positions in MetricSums.sums.
_LOSS, _WEIGHT, _SAMPLES, _CORRECT, _TOP5, _ABS, _SQ, _Y, _Y2, _ELEMENTS = range(10)


class MetricSums:
    """Numerators and denominators of a task's validation metrics, added batch by batch.

    Args:
        task: ``classification`` (outputs ``(batch, classes)`` logits, targets ``(batch,)``
            class indices) or ``regression`` (outputs and targets ``(batch, D)``).
        loss_fn: the job's loss module (``reduction="mean"``, as :func:`build_loss` makes them).
        device: where the sums live (the batches' device).
    """

    def __init__(self, task: str, loss_fn: nn.Module, device: torch.device) -> None:
        self.task, self.loss_fn = task, loss_fn
        self.sums = torch.zeros(10, device=device, dtype=torch.float64)
        self.top5 = False

    def add(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch (call under the run's autocast, as the loss is computed in training)."""
        numerator, denominator = _loss_sums(self.loss_fn, outputs, targets)
        sums = self.sums
        sums[_LOSS] += numerator
        sums[_WEIGHT] += denominator
        sums[_SAMPLES] += targets.shape[0]
        if self.task == "classification":
            sums[_CORRECT] += (outputs.argmax(dim=1) == targets).sum()
            if outputs.shape[1] > 5:
                self.top5 = True
                sums[_TOP5] += (outputs.topk(5, dim=1).indices == targets[:, None]).any(dim=1).sum()
            return
        error, target = (outputs - targets).double(), targets.double()
        sums[_ABS] += error.abs().sum()
        sums[_SQ] += (error**2).sum()
        sums[_Y] += target.sum()
        sums[_Y2] += (target**2).sum()
        sums[_ELEMENTS] += target.numel()

    def all_reduce(self) -> None:
        """Sum every process's sums into each (a collective; a no-op without a process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)

    def compute(self) -> dict[str, float]:
        """The metrics of everything added (and all-reduced), ``val_``-prefixed; one sync.

        Raises:
            ValueError: nothing was added (an empty validation set).
        """
        s = self.sums.tolist()  # the sync point: once per evaluation, not per batch
        if not s[_SAMPLES]:
            raise ValueError("no validation samples")
        loss = s[_LOSS] / s[_WEIGHT] if s[_WEIGHT] else float("nan")
        if self.task == "classification":
            metrics = {"val_loss": loss, "val_accuracy": s[_CORRECT] / s[_SAMPLES]}
            if self.top5:
                metrics["val_top5_accuracy"] = s[_TOP5] / s[_SAMPLES]
            return metrics
        elements = s[_ELEMENTS]
        total_variance = s[_Y2] - s[_Y] ** 2 / elements
        return {
            "val_loss": loss,
            "val_mae": s[_ABS] / elements,
            "val_rmse": (s[_SQ] / elements) ** 0.5,
            "val_r2": 1.0 - s[_SQ] / total_variance if total_variance > 0 else float("nan"),
        }


def _loss_sums(loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
    """``(numerator, denominator)`` of ``loss_fn``'s mean over this batch, so that sums of each
    over batches divide to the mean over their union."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        per_sample = F.cross_entropy(
            outputs, targets, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index,
            reduction="none", label_smoothing=loss_fn.label_smoothing,
        )  # w_y · l_i per sample
        kept = targets != loss_fn.ignore_index
        if loss_fn.weight is None:
            return per_sample.double().sum(), kept.sum()
        return per_sample.double().sum(), loss_fn.weight[targets[kept]].double().sum()
    # Every other loss the spec offers is a mean over the N·D elements of its input.
    return loss_fn(outputs, targets).double() * outputs.numel(), outputs.numel()
