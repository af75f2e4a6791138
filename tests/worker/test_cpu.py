"""The worker's choice of torch threads: the CPUs it may use, the DataLoader workers, the probe
before step 1 and the count a resumed checkpoint was trained with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from tests.fixtures import fast_digits_spec
from tests.worker.test_engine import Recorder, final_checkpoint
from worker.training import TrainingStopped, run_training
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


@pytest.mark.parametrize(("data_ms", "step_ms", "expected"), [
    (45, {1: 340, 2: 170}, 2),  # photos at 64 px (bench/README.md): the workers idle, torch takes both cores
    (5.4, {1: 5.6, 2: 5.1}, 1),  # digits at 8 px: the workers are busy half the time, keep their cores
    (45, {1: 340, 2: 330}, 1),  # a model that does not scale: sharing is not worth the oversubscription
    (100, {1: 340, 2: 170}, 1),  # the workers would be busy more than a quarter of a step
])
def test_decide_threads_shares_the_cores_only_when_the_workers_idle_and_it_pays(data_ms, step_ms, expected):
    step_s = {threads: ms / 1000 for threads, ms in step_ms.items()}
    assert cpu.decide_threads(1, 2, 2, data_ms / 1000, step_s) == expected


@pytest.fixture
def settings(stack, tmp_path: Path) -> Settings:
    return stack.settings.model_copy(update={"data_cache_dir": tmp_path / "cache", "progress_interval_s": 0.1})


def test_the_probed_thread_count_holds_for_the_whole_job_and_its_resume(storage: Storage, settings: Settings, tmp_path: Path, monkeypatch):
    """On 2 CPUs with 2 DataLoader workers the probe may give torch both cores; a resume must train with
    what the checkpoint was trained with (1 and 2 threads round differently), whatever it would choose now."""
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
    spec = JobSpec.model_validate(fast_digits_spec(epochs=2, num_workers=2))
    run_training("threads-reference", spec, storage, settings.model_copy(update={"torch_threads": 2}), Recorder())

    monkeypatch.setattr(cpu, "IDLE_DATA_FRACTION", float("inf"))  # the probe times both counts
    monkeypatch.setattr(cpu, "decide_threads", lambda reserve, share, *args: share)  # and picks 2
    with pytest.raises(TrainingStopped):
        run_training("threads-resumed", spec, storage, settings, Recorder(stop_at_step=30))
    monkeypatch.setattr(cpu, "decide_threads", lambda reserve, share, *args: reserve)  # it would pick 1 now
    run_training("threads-resumed", spec, storage, settings, Recorder())

    want, got = final_checkpoint(storage, "threads-reference", tmp_path), final_checkpoint(storage, "threads-resumed", tmp_path)
    assert got["torch_threads"] == 2
    for name, tensor in want["model"].items():  # the probe changed nothing of the job but its threads
        assert torch.equal(got["model"][name], tensor), name


def test_the_same_spec_beside_a_cpu_hog_trains_to_the_same_weights(storage: Storage, settings: Settings, tmp_path: Path, monkeypatch):
    """Issue 19: a probe timed on a busy machine chose another thread count, and the same spec ended
    with other weights. Run 2 is beside a real CPU hog, and its probe is made to choose the other
    count (what a hog can do): it must train with the count run 1 recorded."""
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpu, "IDLE_DATA_FRACTION", float("inf"))  # the probe times both counts
    spec = JobSpec.model_validate(fast_digits_spec(epochs=1, num_workers=1))  # reserve 1 thread, share 2
    monkeypatch.setattr(cpu, "decide_threads", lambda reserve, share, *args: share)
    run_training("hog-quiet", spec, storage, settings, Recorder())
    monkeypatch.setattr(cpu, "decide_threads", lambda reserve, share, *args: reserve)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a core kept busy
    try:
        run_training("hog-busy", spec.model_copy(update={"name": "another name"}), storage, settings, Recorder())
    finally:
        hog.kill()
        hog.wait()
    want, got = final_checkpoint(storage, "hog-quiet", tmp_path), final_checkpoint(storage, "hog-busy", tmp_path)
    assert want["torch_threads"] == got["torch_threads"] == 2
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


def test_seeded_transform_restores_the_global_generator_and_is_deterministic():
    from PIL import Image

    from shared.spec import ImageFolderDataset
    from worker.training.transforms import SeededTransform, build_transform

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
