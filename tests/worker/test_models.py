"""Models a spec can name, and the engine's independence from Celery and FastAPI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from shared.spec import TORCHVISION_ARCHS, ModelSpec
from worker.training.models import SmallCNN, build_model


def test_every_listed_torchvision_arch_exists():
    available = set(torchvision.models.list_models(module=torchvision.models))
    assert set(TORCHVISION_ARCHS) - available == set()


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32), (1, 5)])
def test_small_cnn_maps_images_to_logits(channels: int, size: int):
    model = SmallCNN(channels, num_classes=7)
    assert model(torch.rand(4, channels, size, size)).shape == (4, 7)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_are_built_with_random_weights_and_num_classes(arch: str):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch), input_shape=(3, 64, 64), num_outputs=5).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_engine_imports_neither_celery_nor_fastapi():
    code = "import sys, worker.training; print([m for m in ('celery', 'fastapi', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['torch']"


def test_worker_package_exposes_the_celery_app_lazily():
    code = "import sys, worker; assert 'celery' not in sys.modules; print(worker.app.main)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "trainq"


def test_an_input_size_the_model_cannot_take_fails_before_training_naming_the_field():
    from shared.exceptions import JobFailure
    from shared.spec import JobSpec
    from worker.training.engine import _check_input_size

    spec = JobSpec.model_validate({"dataset": {"uri": "s3://trainq/d/", "image_size": 8}, "model": {"arch": "alexnet"}})
    model = build_model(spec.model, input_shape=(3, 8, 8), num_outputs=3)
    state = torch.get_rng_state()
    with pytest.raises(JobFailure, match=r"model.arch 'alexnet' cannot take 3x8x8 images \(dataset.image_size=8\)"):
        _check_input_size(model, spec, torch.device("cpu"))
    assert model.training and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_models_take_grayscale_input(arch: str):
    model = build_model(ModelSpec(arch=arch), input_shape=(1, 64, 64), num_outputs=4).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4)
