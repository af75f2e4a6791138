"""The worker's choice of torch threads: the CPUs it may use, minus the DataLoader workers."""

from __future__ import annotations

import os

import pytest
import torch

from worker.training import cpu


def test_usable_cpus_follows_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu, "_CGROUP_CPU_MAX", cpu_max)
    cpu_max.write_text("max 100000\n")
    assert cpu.usable_cpus() == 8
    cpu_max.write_text("250000 100000\n")  # docker --cpus 2.5
    assert cpu.usable_cpus() == 3
    cpu_max.write_text("50000 100000\n")
    assert cpu.usable_cpus() == 1


@pytest.mark.parametrize(("cpus", "num_workers", "configured", "expected"), [
    (2, 2, 0, 1),  # the issue-9 machine: 2 cores, 2 DataLoader workers -> 1 thread, not 2
    (2, 0, 0, 2),
    (16, 4, 0, 12),
    (4, 8, 0, 1),
    (16, 4, 3, 3),  # TORCH_THREADS wins
])
def test_training_threads(monkeypatch, cpus, num_workers, configured, expected):
    monkeypatch.setattr(cpu, "usable_cpus", lambda: cpus)
    assert cpu.training_threads(num_workers, configured) == expected


def test_seeded_transform_restores_the_global_generator_and_is_deterministic():
    from PIL import Image

    from shared.spec import ImageFolderDataset
    from worker.training.data import SeededTransform, build_transform

    spec = ImageFolderDataset.model_validate(
        {"type": "image_folder", "uri": "s3://trainq/x/", "image_size": 8, "channels": 1,
         "train_transforms": [{"name": "random_crop", "size": 8, "padding": 2}, {"name": "horizontal_flip"}]}
    )
    image = Image.fromarray((torch.arange(64, dtype=torch.uint8).reshape(8, 8) * 3).numpy(), mode="L")
    data = SeededTransform([(image, 0)] * 4, [0, 1, 2, 3], build_transform(spec.train_transforms, spec), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [data[i][0] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), before)  # the training loop's RNG is untouched
    again = [data[i][0] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(first[0], other) for other in first[1:])  # per-sample seeds differ
    data.epoch = 1
    assert not all(torch.equal(a, b) for a, b in zip(first, [data[i][0] for i in range(4)], strict=True))
