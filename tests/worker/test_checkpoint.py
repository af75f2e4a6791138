"""Checkpoints load with weights_only=True and restore every RNG exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from worker.training.checkpoint import (
    Snapshot,
    capture_rng_state,
    checkpoint_payload,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    write_checkpoint,
)
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


def test_a_snapshot_keeps_the_state_of_its_step_while_training_goes_on(tmp_path: Path):
    # The loop snapshots at a step boundary and the upload thread writes the file later: the
    # steps taken in between must not reach the file (a resume would not be bit-identical).
    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad()
        model(torch.rand(2, 1, 8, 8)).sum().backward()
        optimizer.step()

    train_step()
    expected_model = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    expected_moments = {index: {key: value.clone() for key, value in state.items()} for index, state in optimizer.state_dict()["state"].items()}
    loader_state = {"position": [1, 2]}
    snapshot = Snapshot(checkpoint_payload(
        job_id="j", model=model, optimizer=optimizer, epoch=0, step=1, metrics={}, spec={}, classes=["a"],
        loader_state=loader_state,
    ))
    for _ in range(3):
        train_step()
    loader_state["position"].append(3)
    checkpoint = load_checkpoint(write_checkpoint(tmp_path / "c.pt", snapshot))
    assert checkpoint["step"] == 1 and checkpoint["loader"] == {"position": [1, 2]}
    for name, tensor in expected_model.items():
        assert torch.equal(checkpoint["model"][name], tensor), name
        assert not torch.equal(model.state_dict()[name], tensor) or not tensor.is_floating_point(), name
    for index, state in expected_moments.items():
        for key, value in state.items():
            assert torch.equal(checkpoint["optimizer"]["state"][index][key], value), (index, key)
