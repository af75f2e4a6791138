"""Image transforms from a spec, batch collation, and augmentation seeded per sample.

Augmentations are seeded per sample from ``(seed, epoch, index)``, not by whichever DataLoader
worker happens to load the sample, so a resumed run sees exactly the images an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from shared.spec import ImageFolderDataset, Transform
from worker.training.decode import stack_images


def _transform_op(spec: Transform) -> v2.Transform:
    match spec.name:
        case "resize":
            return v2.Resize(spec.size, antialias=True)
        case "center_crop":
            return v2.CenterCrop(spec.size)
        case "random_crop":
            return v2.RandomCrop(spec.size, padding=spec.padding or None)
        case "random_resized_crop":
            return v2.RandomResizedCrop(spec.size, scale=spec.scale, antialias=True)
        case "horizontal_flip":
            return v2.RandomHorizontalFlip(spec.p)
        case "color_jitter":
            return v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    raise ValueError(f"unknown transform {spec.name!r}")  # unreachable: the spec lists them all


def _augment_ops(steps: list[Transform], spec: ImageFolderDataset) -> list[v2.Transform]:
    return [v2.ToImage(), *(_transform_op(step) for step in steps), v2.Resize((spec.image_size, spec.image_size), antialias=True)]


def _finish_ops(spec: ImageFolderDataset) -> list[v2.Transform]:
    ops: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
    if spec.normalize is not None:
        mean, std = spec.normalize.values()
        ops.append(v2.Normalize(list(mean) * (spec.channels // len(mean)), list(std) * (spec.channels // len(std))))
    return ops


def build_transform(steps: list[Transform], spec: ImageFolderDataset) -> v2.Compose:
    """A torchvision v2 pipeline: PIL image → ``steps`` → resize to ``image_size`` → float in
    [0, 1] of shape ``(channels, image_size, image_size)`` → optional normalize.

    The whole pipeline for one image (inference, tests). A job runs it in two parts with the same
    result: :func:`build_augment` in the DataLoader workers, :func:`build_finish` on the batch
    once it is on the training device.
    """
    return v2.Compose([*_augment_ops(steps, spec), *_finish_ops(spec)])


def build_augment(steps: list[Transform], spec: ImageFolderDataset) -> v2.Compose:
    """The DataLoader workers' part of :func:`build_transform`: PIL image → ``steps`` → resize.

    Returns a ``(channels, image_size, image_size)`` tensor in the image's own type: ``uint8``
    for 8-bit images, float in [0, 1] for 16-bit and float ones (see
    :func:`worker.training.decode.to_mode`). A uint8 batch is a quarter of the bytes of a float32
    one through shared memory, pinning and the host-to-device copy: at 224 px, 150 KB an image
    instead of 602 KB. timm's ``PrefetchLoader`` and NVIDIA's DALI examples normalize on the GPU
    for the same reason.
    """
    return v2.Compose(_augment_ops(steps, spec))


def build_finish(spec: ImageFolderDataset) -> v2.Compose:
    """The training process's part of :func:`build_transform`, for a batch on the device:
    ``(batch, channels, H, W)`` uint8 or float in [0, 1] → float32 in [0, 1] → optional
    normalize. Elementwise IEEE operations (÷ 255, − mean, ÷ std), so a batch finished on a
    GPU equals one finished on the CPU bit for bit.
    """
    return v2.Compose(_finish_ops(spec))


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``default_collate`` for ``(image, label)`` samples of :func:`build_augment`.

    A folder of 8-bit and 16-bit images yields uint8 and float samples; a batch that mixes them
    is scaled to float32 in [0, 1] first (what :func:`build_finish` would do to each), so no
    uint8 value is ever stacked unscaled beside floats.
    """
    return stack_images([image for image, _ in batch]), default_collate([label for _, label in batch])


class SeededTransform(Dataset):
    """``indices`` of ``base`` (PIL image, label) pairs with ``transform`` applied to the image.

    Random transforms draw from a generator seeded by ``(seed, epoch, index)``, so the same
    sample gets the same augmentation in the same epoch whatever worker loads it and however
    often the job was resumed. Set ``epoch`` before each epoch.
    """

    def __init__(self, base: Dataset, indices: list[int], transform: v2.Compose, seed: int) -> None:
        self.base, self.indices, self.transform, self.seed = base, indices, transform, seed
        # In shared memory: persistent DataLoader workers keep their copy of this dataset from
        # one epoch to the next, and must still see the epoch set in the training process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose augmentations ``__getitem__`` draws (shared with DataLoader workers)."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = self.indices[position]
        image, label = self.base[index]
        with seeded_draws(self.sample_seed(index)):
            return self.transform(image), label

    def sample_seed(self, index: int) -> int:
        """The seed of sample ``index``'s augmentation this epoch: a function of (seed, epoch, index)."""
        return hash((self.seed, self.epoch, index)) & (2**63 - 1)


@contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """Random transforms inside draw from the CPU generator seeded with ``seed``; its state is put back.

    torchvision's random transforms draw from the CPU generator, whatever the image's device.
    Only that one is seeded: torch.manual_seed + fork_rng also touch every accelerator's
    generator and cost ~140 µs a sample, more than decoding an 8x8 PNG (bench/README.md).
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)
