"""The fast path (spec ``performance``): validation, precision per device, what each helper does
on the CPU, persistent DataLoader workers, and jobs in bf16 / channels_last / compiled that
checkpoint the plain model and resume bit-identically. CUDA-only paths (fp16, NCCL) run in
``bench/gpu.sh``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from shared.exceptions import JobFailure
from shared.settings import Settings
from shared.spec import JobSpec, PerformanceSpec
from shared.storage import Storage
from tests.fixtures import fast_digits_spec, with_dataset
from tests.worker.test_engine import Recorder
from trainq.sample_data import write_digits, write_table
from worker.training import TrainingStopped, run_training
from worker.training.checkpoint import load_checkpoint
from worker.training.transforms import SeededTransform
from worker.training.fastpath import FastPath, build_fast_path, configure_backends, resolve_precision
from worker.training.models import SmallCNN

CPU = torch.device("cpu")


def errors(body: dict) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(body)
    return [(error["loc"], error["msg"]) for error in caught.value.errors()]


def test_performance_settings_validate_strictly_with_safe_defaults():
    spec = JobSpec.model_validate(fast_digits_spec())
    assert spec.performance == PerformanceSpec(
        precision="auto", channels_last="auto", cudnn_benchmark=False, deterministic=False, compile=False,
        persistent_workers=False, prefetch_factor=None,
    )
    assert spec.resources.gpus == 1
    assert errors(fast_digits_spec(performance={"precision": "fp8"}))[0][0] == ("performance", "precision")
    assert errors(fast_digits_spec(performance={"compile": 1}))[0][0] == ("performance", "compile")  # strict
    assert {loc for loc, _ in errors(fast_digits_spec(performance={"channels_last": "yes"}))} == {
        ("performance", "channels_last", "literal['auto']"), ("performance", "channels_last", "bool"),
    }
    # cross-field errors name the section at fault (a 422's loc), not just the body
    assert errors(fast_digits_spec(num_workers=0, performance={"prefetch_factor": 4})) == [
        (("performance",), "Value error, performance.prefetch_factor needs num_workers > 0 (DataLoader worker processes)")
    ]
    loc, message = errors(fast_digits_spec(num_workers=0, performance={"persistent_workers": True}))[0]
    assert loc == ("performance",) and "persistent_workers needs num_workers > 0" in message
    loc, message = errors(fast_digits_spec(batch_size=64, resources={"gpus": 3}))[0]
    assert loc == ("resources",) and "must divide evenly over resources.gpus 3" in message
    assert errors(fast_digits_spec(resources={"gpus": 0}))[0][0] == ("resources", "gpus")
    explicit = JobSpec.model_validate(fast_digits_spec(performance={"channels_last": True, "precision": "bf16", "prefetch_factor": 4}))
    assert explicit.performance.channels_last is True and explicit.performance.prefetch_factor == 4


def test_precision_on_a_cpu():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(JobFailure, match="performance.precision 'fp16' needs a CUDA device"):
        resolve_precision("fp16", CPU)


def _train_steps(model: nn.Module, fast: FastPath | None, steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        inputs, targets = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        if fast is None:  # the plain loop
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
        else:
            inputs, targets = fast.to_device(inputs, targets)
            with fast.autocast():
                loss = nn.functional.cross_entropy(model(inputs), targets)
            fast.backward(loss)
            fast.unscale(optimizer)
            fast.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return model


def _small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return SmallCNN(1, 10, width=8)


def test_cpu_defaults_are_the_plain_loop_bit_for_bit():
    fast = build_fast_path(PerformanceSpec(), CPU, image_inputs=True)
    assert (fast.precision, fast.channels_last, fast.scaler) == ("fp32", False, None)
    plain, through = _train_steps(_small_cnn(), None), _train_steps(_small_cnn(), fast)
    for (name, want), got in zip(plain.state_dict().items(), through.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_bf16_autocast_and_channels_last_on_a_cpu_train_fp32_weights():
    fast = build_fast_path(PerformanceSpec(precision="bf16", channels_last=True), CPU, image_inputs=True)
    assert fast.precision == "bf16" and fast.channels_last
    rgb, _ = fast.to_device(torch.randn(4, 3, 8, 8), torch.zeros(4))
    assert rgb.is_contiguous(memory_format=torch.channels_last) and not rgb.is_contiguous()
    model = _small_cnn()
    with fast.autocast():
        assert model(torch.randn(4, 1, 8, 8)).dtype == torch.bfloat16
    before = _small_cnn().state_dict()
    trained = _train_steps(model, fast).state_dict()
    assert all(tensor.dtype == before[name].dtype for name, tensor in trained.items())  # master weights stay fp32
    assert not torch.equal(trained["head.weight"], before["head.weight"])
    # Not for CSV rows: channels_last is about 4-D images only.
    assert not build_fast_path(PerformanceSpec(channels_last=True), CPU, image_inputs=False).channels_last


def test_the_loss_scaler_skips_inf_steps_and_its_state_round_trips():
    fast = FastPath(CPU, "fp16", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model.weight.detach().clone()
    fast.backward(model(torch.ones(2, 3)).sum() * float("inf"))
    fast.step(optimizer)  # inf gradients: the step is skipped and the scale halves
    assert torch.equal(model.weight, weight) and fast.state_dict()["scale"] == 512.0
    restored = FastPath(CPU, "fp16", scaler=torch.amp.GradScaler("cpu"))
    restored.load_state_dict(fast.state_dict())
    assert restored.scaler.get_scale() == 512.0
    assert FastPath(CPU).state_dict() is None


def test_backend_flags_are_set_for_every_job():
    try:
        configure_backends(PerformanceSpec(cudnn_benchmark=True, deterministic=True), CPU)
        assert torch.backends.cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()  # deterministic is for CUDA only
        configure_backends(PerformanceSpec(), CPU)  # the next job's defaults undo the last job's choice
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    finally:
        configure_backends(PerformanceSpec(), CPU)


def test_persistent_dataloader_workers_see_each_new_epoch():
    images = [(Image.fromarray((torch.arange(64).reshape(8, 8) * (i + 1) % 256).byte().numpy()), i) for i in range(6)]
    transform = v2.Compose([v2.ToImage(), v2.RandomCrop(6, padding=2), v2.ToDtype(torch.float32, scale=True)])

    def epochs(**loader: object) -> list[torch.Tensor]:
        dataset = SeededTransform(images, list(range(6)), transform, seed=3)
        batches = DataLoader(dataset, batch_size=6, **loader)
        out = []
        for epoch in range(3):
            dataset.epoch = epoch
            out += [inputs for inputs, _ in batches]
        return out

    in_process, persistent = epochs(), epochs(num_workers=1, persistent_workers=True)
    assert not torch.equal(in_process[0], in_process[1])  # augmentations change with the epoch
    for want, got in zip(in_process, persistent, strict=True):
        assert torch.equal(got, want)


# -- jobs through the engine ------------------------------------------------------------------


@pytest.fixture
def settings(stack, tmp_path: Path) -> Settings:
    return stack.settings.model_copy(update={"data_cache_dir": tmp_path / "cache", "progress_interval_s": 0.1})


@pytest.fixture(scope="module")
def digits_table(stack) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.csv"
        write_table(path, "digits")
        return Storage(stack.settings).upload_file(path, "s3://trainq/tables/precision-digits.csv")


def csv_spec(uri: str, **performance: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"type": "csv", "uri": uri, "target": "target", "task": "classification"},
            "model": {"arch": "mlp", "hidden_sizes": [32], "dropout": 0.1},
            "optimizer": {"lr": 0.01},
            "epochs": 1,
            "performance": performance,
        }
    )


def final(storage: Storage, job_id: str, tmp_path: Path) -> dict:
    return load_checkpoint(storage.download_file(storage.job_uri(job_id, "checkpoints", "final.pt"), tmp_path / f"{job_id}.pt"))


def test_auto_on_a_cpu_is_fp32_and_bf16_trains(storage: Storage, settings: Settings, digits_table: str, tmp_path: Path):
    for job_id, precision in (("prec-auto", "auto"), ("prec-fp32", "fp32"), ("prec-bf16", "bf16")):
        run_training(job_id, csv_spec(digits_table, precision=precision), storage, settings, Recorder())
    auto, fp32, bf16 = (final(storage, job, tmp_path) for job in ("prec-auto", "prec-fp32", "prec-bf16"))
    for name, tensor in fp32["model"].items():
        assert torch.equal(auto["model"][name], tensor), name
        assert bf16["model"][name].dtype == torch.float32
    assert not torch.equal(bf16["model"]["layers.0.weight"], fp32["model"]["layers.0.weight"])
    assert bf16["metrics"]["val_accuracy"] == pytest.approx(fp32["metrics"]["val_accuracy"], abs=0.03)
    assert bf16["metrics"]["val_accuracy"] > 0.8 and bf16["scaler"] is None


def test_a_compiled_model_checkpoints_its_plain_state_dict(
    storage: Storage, settings: Settings, digits_table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    compiled = []
    real_compile = torch.compile

    def eager_compile(module: nn.Module) -> nn.Module:
        # torch.compile's "eager" backend: dynamo traces the model as in a real compile, but
        # no C++ is generated (inductor takes minutes on a small CPU).
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    run_training("prec-compiled", csv_spec(digits_table, compile=True), storage, settings, Recorder())
    assert len(compiled) == 1
    checkpoint = final(storage, "prec-compiled", tmp_path)
    assert list(checkpoint["model"]) == list(compiled[0].state_dict())  # no "_orig_mod." prefix
    assert checkpoint["metrics"]["val_accuracy"] > 0.8


def test_bf16_channels_last_persistent_workers_image_job_resumes_bit_identically(storage: Storage, settings: Settings, tmp_path: Path):
    uri = "s3://trainq/datasets/digits-300/"
    with tempfile.TemporaryDirectory() as tmp:
        write_digits(Path(tmp), limit=300)
        storage.upload_dir(Path(tmp), uri)
    performance = {"precision": "bf16", "channels_last": True, "persistent_workers": True, "prefetch_factor": 2}
    spec = JobSpec.model_validate(
        with_dataset(
            fast_digits_spec(epochs=2, batch_size=32, num_workers=1, performance=performance),
            uri=uri,
            image_size=10,
            train_transforms=[{"name": "random_crop", "size": 8, "padding": 1}, {"name": "horizontal_flip"}],
        )
    )
    run_training("prec-nhwc-reference", spec, storage, settings, Recorder())
    with pytest.raises(TrainingStopped):  # 8 steps an epoch: in the second epoch
        run_training("prec-nhwc-resumed", spec, storage, settings, Recorder(stop_at_step=11))
    run_training("prec-nhwc-resumed", spec, storage, settings, Recorder())
    want, got = final(storage, "prec-nhwc-reference", tmp_path), final(storage, "prec-nhwc-resumed", tmp_path)
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    # NHWC weights load into a plain (NCHW) model, e.g. on a worker without the fast path.
    SmallCNN(1, 10).load_state_dict(got["model"])
