"""Validation metrics are the metrics of the whole set: the same at any batch size, with a
ragged last batch, with class weights, and when 2 processes each see part of the set."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worker.training.evaluate import evaluate
from worker.training.metrics import MetricSums
from worker.training.recipe import _OneHotBCE

CLASSES, SAMPLES, OUTPUTS = 7, 23, 3  # 23 samples: every batch size below leaves a ragged last batch
WEIGHTS = torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0, 1.0, 4.0])


def classification_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SAMPLES, CLASSES, generator=generator), torch.randint(0, CLASSES, (SAMPLES,), generator=generator)


def regression_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = 5 + 3 * torch.randn(SAMPLES, OUTPUTS, generator=generator)
    return targets + torch.randn(SAMPLES, OUTPUTS, generator=generator), targets


def batched(task: str, loss_fn: nn.Module, outputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> dict[str, float]:
    sums = MetricSums(task, loss_fn, torch.device("cpu"))
    for start in range(0, len(targets), batch_size):
        sums.add(outputs[start : start + batch_size], targets[start : start + batch_size])
    return sums.compute()


CLASSIFICATION_LOSSES = {
    "cross_entropy": lambda: nn.CrossEntropyLoss(),
    "weighted": lambda: nn.CrossEntropyLoss(weight=WEIGHTS),
    "weighted_smoothed": lambda: nn.CrossEntropyLoss(weight=WEIGHTS, label_smoothing=0.1),
    "bce": lambda: _OneHotBCE(CLASSES, pos_weight=3.0),
}


@pytest.mark.parametrize("batch_size", [1, 3, 8, SAMPLES])
@pytest.mark.parametrize("loss", sorted(CLASSIFICATION_LOSSES))
def test_classification_metrics_equal_the_one_batch_computation(loss: str, batch_size: int):
    loss_fn = CLASSIFICATION_LOSSES[loss]()
    outputs, targets = classification_set()
    got = batched("classification", loss_fn, outputs, targets, batch_size)
    assert got["val_loss"] == pytest.approx(loss_fn(outputs, targets).item(), rel=1e-6)
    assert got["val_accuracy"] == (outputs.argmax(1) == targets).sum().item() / SAMPLES
    top5 = (outputs.topk(5, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
    assert got["val_top5_accuracy"] == pytest.approx(top5)


@pytest.mark.parametrize("batch_size", [1, 3, 8, SAMPLES])
@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.L1Loss(), nn.SmoothL1Loss(beta=0.5), nn.HuberLoss(delta=2.0)], ids=str)
def test_regression_metrics_equal_the_one_batch_computation(loss_fn: nn.Module, batch_size: int):
    outputs, targets = regression_set()
    got = batched("regression", loss_fn, outputs, targets, batch_size)
    error = (outputs - targets).double()
    target = targets.double()
    assert got["val_loss"] == pytest.approx(loss_fn(outputs, targets).item(), rel=1e-6)
    assert got["val_mae"] == pytest.approx(error.abs().mean().item())
    assert got["val_rmse"] == pytest.approx(math.sqrt((error**2).mean().item()))
    assert got["val_r2"] == pytest.approx(1 - (error**2).sum().item() / ((target - target.mean()) ** 2).sum().item())


def test_evaluate_gives_the_weighted_loss_of_the_whole_set_at_any_batch_size():
    # The bug of pytorch/pytorch#61309: a mean of per-batch weighted means moves with the batch size.
    inputs, targets = classification_set()
    model = nn.Linear(CLASSES, CLASSES)
    loss_fn = nn.CrossEntropyLoss(weight=WEIGHTS)
    with torch.no_grad():
        whole = loss_fn(model(inputs), targets).item()
    for batch_size in (3, 8, SAMPLES):
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)
        metrics = evaluate(model, loader, loss_fn, torch.device("cpu"))
        assert metrics["val_loss"] == pytest.approx(whole, rel=1e-6), batch_size


def _rank(rank: int, port: int, task: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        outputs, targets = classification_set() if task == "classification" else regression_set()
        loss_fn = nn.CrossEntropyLoss(weight=WEIGHTS) if task == "classification" else nn.MSELoss()
        sums = MetricSums(task, loss_fn, torch.device("cpu"))
        # Rank r takes samples r, r + 2, … (DistributedSampler's split: 12 and 11), in batches of 5.
        mine_outputs, mine_targets = outputs[rank::2], targets[rank::2]
        for start in range(0, len(mine_targets), 5):
            sums.add(mine_outputs[start : start + 5], mine_targets[start : start + 5])
        sums.all_reduce()
        results[rank] = sums.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_two_processes_all_reduce_to_the_one_batch_metrics(task: str):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_rank, args=(port, task, results), nprocs=2, start_method="spawn")
        got = dict(results)
    outputs, targets = classification_set() if task == "classification" else regression_set()
    loss_fn = nn.CrossEntropyLoss(weight=WEIGHTS) if task == "classification" else nn.MSELoss()
    one_batch = batched(task, loss_fn, outputs, targets, SAMPLES)
    assert got[0] == got[1]
    assert got[0] == pytest.approx(one_batch, rel=1e-6)  # float32 losses, float64 sums
    assert got[0]["val_loss"] == pytest.approx(loss_fn(outputs, targets).item(), rel=1e-6)
