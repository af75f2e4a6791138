"""The memory estimate made before training, its budget, and the cap on decoded image sizes.
Unit tests: local data, no stack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.exceptions import DatasetError, JobFailure
from shared.settings import Settings
from shared.spec import JobSpec, ModelSpec
from shared.storage import Storage
from worker.training.prepare import prepare
from worker.training.memory import activation_bytes, estimate_memory
from worker.training.models import build_model


def spec_for(**overrides) -> JobSpec:
    spec = {"dataset": {"uri": "local://imgs", "image_size": 16, "channels": 3}, "model": {"arch": "small_cnn"}, "batch_size": 8,
            "num_workers": 0}
    spec.update(overrides)
    return JobSpec.model_validate(spec)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / "imgs" / name).mkdir(parents=True)
        for index in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / "imgs" / name / f"{index}.png")
    return Settings(data_root=tmp_path / "data", data_cache_dir=tmp_path / "cache")


def saved_by_a_real_forward(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """What autograd really saves on the CPU (distinct storages that are not parameters), plus inputs and outputs."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model.train()(inputs)
    return sum(saved.values()) + inputs.nbytes + outputs.nbytes


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "mobilenet_v3_small"])
def test_activations_measured_on_the_meta_device_match_a_real_forward(arch: str):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch), input_shape=(3, 64, 64), num_outputs=5)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert activation_bytes(model, (3, 64, 64), 4) == saved_by_a_real_forward(model, torch.rand(4, 3, 64, 64))
    model2 = build_model(ModelSpec(arch=arch), input_shape=(3, 64, 64), num_outputs=5)
    model2.load_state_dict(before)
    activation_bytes(model2, (3, 64, 64), 4)
    assert all(torch.equal(model2.state_dict()[name], t) for name, t in before.items())  # BatchNorm statistics untouched


def test_estimate_adds_parameters_gradients_optimizer_state_and_activations():
    model = build_model(ModelSpec(arch="mlp", hidden_sizes=[64]), input_shape=(10,), num_outputs=3)
    params = sum(p.numel() for p in model.parameters()) * 4  # float32
    csv = {"type": "csv", "uri": "s3://trainq/t.csv", "target": "y", "task": "classification"}
    adam = estimate_memory(model, spec_for(dataset=csv, model={"arch": "mlp"}, batch_size=32), (10,), None)
    assert adam.parameters_bytes == adam.gradients_bytes == params and adam.optimizer_bytes == 2 * params  # exp_avg, exp_avg_sq
    sgd = estimate_memory(model, spec_for(dataset=csv, model={"arch": "mlp"}, batch_size=32, optimizer={"name": "sgd"}), (10,), None)
    assert sgd.optimizer_bytes == 0
    momentum = spec_for(dataset=csv, model={"arch": "mlp"}, batch_size=32, optimizer={"name": "sgd", "momentum": 0.9})
    assert estimate_memory(model, momentum, (10,), None).optimizer_bytes == params
    double = estimate_memory(model, spec_for(dataset=csv, model={"arch": "mlp"}, batch_size=64), (10,), None)
    assert double.activations_bytes == 2 * adam.activations_bytes  # linear in batch_size
    assert adam.total_bytes == adam.parameters_bytes + adam.gradients_bytes + adam.optimizer_bytes + adam.activations_bytes


def test_a_job_over_its_memory_budget_is_refused_in_preparation_with_the_numbers(settings: Settings):
    storage = Storage(settings)
    fits = prepare(spec_for(), storage, settings, torch.device("cpu"), budget_bytes=None)
    budget = fits.memory.total_bytes - 1
    with pytest.raises(JobFailure) as error:
        prepare(spec_for(), storage, settings, torch.device("cpu"), budget_bytes=budget)
    message = str(error.value)
    assert error.value.loc == ["body", "batch_size"] and error.value.error_type == "memory_budget_exceeded"
    assert "MAX_JOB_MEMORY_BYTES" in message and "batch_size 8 of 3x16x16 inputs" in message
    assert f"{fits.memory.total_bytes / 2**20:.1f} MiB" in message and f"{budget / 2**20:.1f} MiB" in message


def test_an_image_with_too_many_pixels_is_refused_naming_the_file(settings: Settings):
    Image.new("RGB", (300, 200)).save(settings.data_root / "imgs" / "b" / "huge.png")  # 60,000 pixels, 1 KB on disk
    capped = settings.model_copy(update={"max_image_pixels": 50_000})
    with pytest.raises(DatasetError) as error:
        prepare(spec_for(), Storage(capped), capped, torch.device("cpu"), budget_bytes=None)
    assert "local://imgs/b/huge.png" in str(error.value)
    assert "300x200 = 60,000 pixels is more than MAX_IMAGE_PIXELS (50,000)" in str(error.value)
    assert str(settings.data_root) not in str(error.value)  # never a worker-local path
    prepare(spec_for(), Storage(settings), settings, torch.device("cpu"), budget_bytes=None)  # the default cap lets it through


def test_a_job_on_several_gpus_is_estimated_per_gpu(settings: Settings):
    storage = Storage(settings)
    one = prepare(spec_for(batch_size=4), storage, settings, torch.device("cpu"), budget_bytes=None)
    two = prepare(spec_for(batch_size=8, resources={"gpus": 2}), storage, settings, torch.device("cpu"), budget_bytes=None)
    assert two.memory == one.memory  # each of the 2 processes takes 4 of the global batch of 8
    budget = one.memory.total_bytes - 1
    with pytest.raises(JobFailure, match=r"batch_size 8 \(4 per GPU\) of 3x16x16 inputs"):
        prepare(spec_for(batch_size=8, resources={"gpus": 2}), storage, settings, torch.device("cpu"), budget_bytes=budget)
