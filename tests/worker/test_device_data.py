"""Decoding on the training device (``dataset.decode``): the same batches as the worker path, on
the CPU bit for bit; resume-exact; a bad file named by its URI; the prefetcher's position."""

from __future__ import annotations

import re

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from shared.exceptions import DatasetError
from shared.records import Progress
from shared.spec import ImageFolderDataset, JobSpec
from shared.storage import Storage
from tests.fixtures import fast_digits_spec
from worker.training import StopReason, TrainingCallbacks, TrainingStopped, run_training
from worker.training.checkpoint import load_checkpoint
from worker.training.decode import ORIENTATION_TAG
from worker.training.device_data import EncodedBatch, decodes_on_device, on_device
from worker.training.fastpath import FastPath
from worker.training.images import load_image_folder
from worker.training.prefetch import DevicePrefetcher


def write_photos(root: Path, per_class: int = 12, odd_ones: bool = True) -> Path:
    """Two classes of small JPEGs (some turned by EXIF, some gray); with ``odd_ones`` also a
    CMYK JPEG and a PNG (the device decoder refuses both: they decode on the CPU)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            yy, xx = np.mgrid[0:14, 0:20]
            pixels = np.stack([xx * 12, yy * 18, np.full_like(xx, 60 + 120 * label)], -1) + rng.integers(0, 40, (14, 20, 3))
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            exif = Image.Exif()
            exif[ORIENTATION_TAG] = (1, 6, 3, 8)[index % 4]
            if index % 5 == 4:
                image = image.convert("L")
            image.save(root / name / f"{index:03d}.jpg", quality=90, exif=exif)
    if odd_ones:
        image.convert("CMYK").save(root / "dark" / "cmyk.jpg")
        image.save(root / "light" / "lossless.png")
    return root


def spec_of(decode: str, channels: int = 3) -> ImageFolderDataset:
    return ImageFolderDataset(
        uri="local://photos", image_size=12, val_fraction=0.25, decode=decode, channels=channels,
        train_transforms=[{"name": "random_resized_crop", "size": 12}, {"name": "horizontal_flip"}, {"name": "color_jitter", "brightness": 0.3}],
        eval_transforms=[{"name": "center_crop", "size": 12}],
        normalize={"preset": "imagenet"} if channels == 3 else {"mean": [0.5], "std": [0.25]},
    )


@pytest.mark.parametrize("channels", [3, 1])
def test_device_decoding_gives_the_worker_paths_batches_bit_for_bit_on_the_cpu(tmp_path: Path, channels: int):
    write_photos(tmp_path / "root" / "photos")
    spec = spec_of("device", channels=channels)
    workers = load_image_folder(spec, None, tmp_path / "cache", seed=5, data_root=tmp_path / "root")
    device = on_device(load_image_folder(spec, None, tmp_path / "cache", seed=5, data_root=tmp_path / "root"), spec, torch.device("cpu"))
    fast = FastPath(torch.device("cpu"), finish=workers.finish)
    on_device_fast = FastPath(torch.device("cpu"), finish=device.finish)
    for epoch in (0, 3):
        workers.set_epoch(epoch), device.set_epoch(epoch)
        for which in ("train", "val"):
            positions = range(len(getattr(workers, which)))
            want, labels = fast.to_device(*workers.collate([getattr(workers, which)[i] for i in positions]))
            encoded, got_labels = device.collate([getattr(device, which)[i] for i in positions])
            assert isinstance(encoded, EncodedBatch)
            got, got_labels = on_device_fast.to_device(encoded, got_labels)
            assert want.shape == (len(positions), channels, 12, 12) and torch.equal(got, want), (epoch, which)
            assert torch.equal(got_labels, labels)


def test_auto_decodes_on_the_device_on_cuda_with_a_folder_of_jpegs(tmp_path: Path):
    jpegs = load_image_folder(spec_of("auto"), None, tmp_path / "c1", seed=0, data_root=write_photos(tmp_path / "a" / "photos", odd_ones=False).parent)
    mixed = load_image_folder(spec_of("auto"), None, tmp_path / "c2", seed=0, data_root=write_photos(tmp_path / "b" / "photos").parent)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decodes_on_device(spec_of("auto"), cuda, jpegs) and not decodes_on_device(spec_of("auto"), cpu, jpegs)
    assert not decodes_on_device(spec_of("auto"), cuda, mixed)  # a PNG among them: the workers decode
    assert decodes_on_device(spec_of("device"), cpu, mixed) and not decodes_on_device(spec_of("workers"), cuda, jpegs)
    assert on_device(jpegs, spec_of("auto"), cpu) is jpegs


def test_a_file_no_decoder_reads_fails_naming_its_uri_on_both_paths(tmp_path: Path):
    write_photos(tmp_path / "root" / "photos", odd_ones=False)
    spec = spec_of("device")
    data = load_image_folder(spec, None, tmp_path / "cache", seed=0, data_root=tmp_path / "root")  # verified: all good
    # A training sample of class `light` (which ones train is the stratified split's choice).
    position = next(i for i in range(len(data.train)) if "/light/" in data.train.base.samples[data.train.indices[i]][0])
    bad = Path(data.train.base.samples[data.train.indices[position]][0])
    good = bad.read_bytes()
    bad.write_bytes(good[:400] + bytes(len(good) - 400))  # changed after the check: the header intact, the pixels not
    device = on_device(data, spec, torch.device("cpu"))
    uri = re.escape(f"local://photos/light/{bad.name}")
    with pytest.raises(DatasetError, match=rf"cannot read image {uri}: "):
        data.train[position]
    encoded = device.collate([device.train[position], device.train[0 if position else 1]])
    with pytest.raises(DatasetError, match=rf"cannot read image {uri}: "):
        FastPath(torch.device("cpu"), finish=device.finish).to_device(*encoded)


@pytest.mark.parametrize("consumed", [1, 4, 10])
def test_the_prefetchers_position_is_the_loops_not_the_staged_batchs(consumed: int):
    # Staging batch n+1 must not make a mid-epoch checkpoint skip it on resume.
    data = TensorDataset(torch.arange(40.0).view(40, 1), torch.arange(40))

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(data, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))

    everything = [targets.tolist() for _, targets in loader()]
    first = DevicePrefetcher(loader(), FastPath(torch.device("cpu")), ahead=True)
    batches = iter(first)
    seen = [next(batches)[1].tolist() for _ in range(consumed)]
    state = first.state_dict()
    batches.close()
    resumed = DevicePrefetcher(loader(), FastPath(torch.device("cpu")), ahead=True)
    resumed.load_state_dict(state)
    assert seen + [targets.tolist() for _, targets in resumed] == everything


# -- through the engine ----------------------------------------------------------------------------


class _StopAtStep(TrainingCallbacks):
    """Stops the job (worker shutdown) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.phase, self.steps, self.step = None, 0, step

    def on_progress(self, progress: Progress) -> None:
        self.phase = progress.phase

    def stop_requested(self) -> StopReason | None:
        if self.phase != "training":
            return None  # also asked while preparing and validating
        self.steps += 1
        return StopReason.SHUTDOWN if self.steps == self.step else None


def test_a_job_decoding_on_the_device_trains_and_resumes_as_the_worker_path(storage: Storage, stack, tmp_path: Path):
    # On the CPU the two paths give equal batches, so equal weights; a stop mid-epoch and resume
    # of the device path ends there too (augmentations drawn from (seed, epoch, index)).
    root = write_photos(tmp_path / "root" / "photos")
    settings = stack.settings.model_copy(update={"data_cache_dir": tmp_path / "cache", "data_root": tmp_path / "root", "torch_threads": 1})
    raw = fast_digits_spec(epochs=2, batch_size=4, num_workers=1)
    raw["dataset"] = spec_of("workers").model_dump(mode="json")
    raw["model"] = {"arch": "small_cnn"}
    raw["checkpoint"] = {"every_steps": 3}
    weights = {}
    for decode in ("workers", "device"):
        raw["dataset"]["decode"] = decode
        run_training(f"decode-{decode}", JobSpec.model_validate(raw), storage, settings)
        weights[decode] = _final(storage, f"decode-{decode}", tmp_path)
    with pytest.raises(TrainingStopped) as stopped:
        run_training("decode-resumed", JobSpec.model_validate(raw), storage, settings, _StopAtStep(7))
    assert stopped.value.checkpoint.endswith("step-000000007.pt")  # in epoch 2 of 2 (5 steps an epoch)
    run_training("decode-resumed", JobSpec.model_validate(raw), storage, settings)
    weights["resumed"] = _final(storage, "decode-resumed", tmp_path)
    assert root.exists()
    for name, tensor in weights["workers"].items():
        assert torch.equal(weights["device"][name], tensor) and torch.equal(weights["resumed"][name], tensor), name


def _final(storage: Storage, job_id: str, tmp_path: Path) -> dict:
    path = storage.download_file(storage.job_uri(job_id, "checkpoints", "final.pt"), tmp_path / f"{job_id}.pt")
    return load_checkpoint(path)["model"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_staged_batches_equal_the_ones_moved_when_asked(tmp_path: Path):
    # The side stream, the event and record_stream must not change a value (nvJPEG is deterministic).
    write_photos(tmp_path / "root" / "photos")
    spec = spec_of("device")  # the CMYK JPEG and the PNG among them decode on the CPU
    data = on_device(load_image_folder(spec, None, tmp_path / "cache", seed=1, data_root=tmp_path / "root"), spec, torch.device("cuda"))
    fast = FastPath(torch.device("cuda"), channels_last=True, finish=data.finish)

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(data.train, batch_size=4, shuffle=True, num_workers=2, pin_memory=True,
                                  collate_fn=data.collate, generator=torch.Generator().manual_seed(0))

    staged = [(inputs.cpu(), targets.cpu()) for inputs, targets in DevicePrefetcher(loader(), fast)]
    asked = [tuple(t.cpu() for t in fast.to_device(*batch)) for batch in loader()]
    assert len(staged) == len(asked) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(staged, asked))
