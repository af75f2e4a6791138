"""Checkpoints load with weights_only=True and restore every RNG exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from worker.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from worker.training.models import SmallCNN


def draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    model = SmallCNN(1, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    path = save_checkpoint(
        tmp_path / "c.pt", job_id="j", model=model, optimizer=optimizer, epoch=1, step=5,
        metrics={"val_accuracy": np.float64(0.5)}, spec={"epochs": 1}, classes=["a", "b"],
    )
    expected = draw()
    checkpoint = load_checkpoint(path)  # raises if anything in it needs full pickle
    restore_rng_state(checkpoint["rng"])
    assert draw() == expected
    assert isinstance(checkpoint["metrics"]["val_accuracy"], float)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["classes"]) == (1, 5, ["a", "b"])
    restored = SmallCNN(1, 10)
    restored.load_state_dict(checkpoint["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name
    assert not list(tmp_path.glob("*.tmp"))


def test_capture_is_plain_data():
    state = capture_rng_state()
    assert isinstance(state["python"]["internal"], list) and state["numpy"]["keys"].dtype == torch.int64
