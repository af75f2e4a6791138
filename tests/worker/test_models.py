"""Models a spec can name, and the engine's independence from Celery and FastAPI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from shared.exceptions import JobFailure
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
    from worker.training.models import check_input_size

    spec = JobSpec.model_validate({"dataset": {"uri": "s3://trainq/d/", "image_size": 8}, "model": {"arch": "alexnet"}})
    model = build_model(spec.model, input_shape=(3, 8, 8), num_outputs=3)
    state = torch.get_rng_state()
    smallest = r"; the smallest dataset.image_size it takes is 63: RuntimeError"
    with pytest.raises(JobFailure, match=r"model.arch 'alexnet' cannot take 3x8x8 images \(dataset.image_size=8\)" + smallest):
        check_input_size(model, spec, torch.device("cpu"))
    assert model.training and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_models_take_grayscale_input(arch: str):
    model = build_model(ModelSpec(arch=arch), input_shape=(1, 64, 64), num_outputs=4).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4)


def test_the_list_of_batchnorm_archs_matches_the_models():
    from shared.spec import BATCHNORM_ARCHS
    from worker.training.loaders import has_batchnorm

    found = set()
    for arch in ("small_cnn", "mlp", *TORCHVISION_ARCHS):
        spec = ModelSpec(arch=arch)
        shape = (10,) if arch == "mlp" else (3, 224, 224)
        try:
            with torch.device("meta"):  # no memory, no init: fast
                model = build_model(spec, input_shape=shape, num_outputs=3)
        except NotImplementedError:  # regnet computes its widths with real tensors
            model = build_model(spec, input_shape=shape, num_outputs=3)
        if has_batchnorm(model):
            found.add(arch)
    assert found == BATCHNORM_ARCHS


def _spec(**fields):
    from shared.spec import JobSpec

    return JobSpec.model_validate({"dataset": {"uri": "s3://trainq/d/", "image_size": 8}, **fields})


@pytest.mark.parametrize(
    ("arch", "batch_size", "num_train", "setting", "dropped"),
    [
        ("small_cnn", 32, 33, "auto", True),  # the case: 33 images, batch 32
        ("small_cnn", 32, 34, "auto", False),  # a last batch of 2 trains
        ("vgg11", 32, 33, "auto", False),  # no BatchNorm: nothing to protect
        ("small_cnn", 32, 34, True, True),
        ("vgg11", 32, 33, False, False),
    ],
)
def test_drop_last_keeps_a_batch_of_one_from_batchnorm(arch, batch_size, num_train, setting, dropped):
    from worker.training.loaders import drop_last

    spec = _spec(model={"arch": arch}, batch_size=batch_size, drop_last=setting)
    model = build_model(spec.model, input_shape=(3, 8, 8), num_outputs=2)
    assert drop_last(spec, num_train, model) is dropped


def test_a_batch_of_one_for_batchnorm_fails_before_training():
    from shared.exceptions import JobFailure
    from worker.training.loaders import drop_last

    spec = _spec(batch_size=32, drop_last=False)
    with pytest.raises(JobFailure, match=r"with 33 training samples and batch_size 32 the last batch of each epoch holds 1 sample"):
        drop_last(spec, 33, SmallCNN(3, 2))


def _saved(tmp_path, state, name="w.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_initial_weights_saved_from_a_wrapper_load(tmp_path, prefix: str):
    from worker.training.models import load_initial_weights

    source = SmallCNN(1, 3)
    path = _saved(tmp_path, {prefix + key: value for key, value in source.state_dict().items()})
    target = SmallCNN(1, 3)
    load_initial_weights(target, path, "s3://trainq/w.pt")
    assert all(torch.equal(target.state_dict()[key], value) for key, value in source.state_dict().items())


def test_initial_weights_that_do_not_fit_say_what_differs(tmp_path):
    from shared.exceptions import JobFailure
    from worker.training.models import load_initial_weights

    state = SmallCNN(1, 3).state_dict()
    state["head.weight"] = torch.zeros(5, 64)
    state["extra.bias"] = torch.zeros(2)
    del state["features.0.weight"]
    with pytest.raises(JobFailure) as info:
        load_initial_weights(SmallCNN(1, 3), _saved(tmp_path, state), "s3://trainq/w.pt")
    assert str(info.value) == (
        "model.weights_uri s3://trainq/w.pt does not fit model.arch: 1 key(s) missing from the file ('features.0.weight'); "
        "1 unexpected key(s) ('extra.bias'); 1 tensor(s) of another shape ('head.weight': (5, 64) in the file, (3, 64) in the model)"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"^model.weights_uri s3://trainq/w.pt is an empty file \(0 bytes\)$"),
        (b"not a torch file at all", r"^model.weights_uri s3://trainq/w.pt is not a weights-only file saved with torch.save \(\w+: .+\)$"),
    ],
)
def test_empty_or_garbage_weights_give_a_reason(tmp_path, content: bytes, message: str):
    from shared.exceptions import JobFailure
    from worker.training.models import load_initial_weights

    (tmp_path / "w.pt").write_bytes(content)
    with pytest.raises(JobFailure, match=message):
        load_initial_weights(SmallCNN(1, 3), tmp_path / "w.pt", "s3://trainq/w.pt")


def test_compressed_weights_that_would_load_too_much_fail_before_loading(tmp_path):
    """A small deflate-compressed `.pt` declaring 64 MB for a model of ~100 KB: refused from the
    zip directory, naming the URI (it grew the worker by the declared size before; issue 17)."""
    import zipfile

    from worker.training.models import load_initial_weights

    plain, packed = tmp_path / "plain.pt", tmp_path / "packed.pt"
    torch.save({"weight": torch.zeros(16 * 2**20)}, plain)  # 64 MiB of zeros
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    plain.unlink()
    assert packed.stat().st_size < 2**20
    with pytest.raises(JobFailure, match=r"s3://trainq/weights/bomb\.pt would load 67,1\d\d,\d\d\d bytes \(uncompressed\)"):
        load_initial_weights(SmallCNN(1, 3), packed, "s3://trainq/weights/bomb.pt")


def test_weights_within_the_bound_still_load(tmp_path):
    from worker.training.models import load_initial_weights

    source, target = SmallCNN(1, 3), SmallCNN(1, 3)
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}}}, tmp_path / "w.pt")
    load_initial_weights(target, tmp_path / "w.pt", "s3://trainq/w.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))
