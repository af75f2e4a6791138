"""Decode and augment image batches on the training device (``dataset.decode``).

With ``decode: device`` (or ``auto`` on a CUDA GPU with a folder of JPEGs) the DataLoader
workers do no decoding: each reads its file's bytes and header (:func:`decode.peek_header`:
format, mode, EXIF orientation, the ``MAX_IMAGE_PIXELS`` guard) and hands over the encoded
file — compact items, ~40 KB a photo instead of 150 KB of uint8 pixels at 224 px. The
training process decodes each batch in one call on the device (:func:`decode.decode_images`:
nvJPEG on CUDA, libjpeg-turbo on a CPU, Pillow for the files those refuse), runs the spec's
transforms per image with parameters drawn on the CPU from ``(seed, epoch, index)`` — the draws
the worker path makes, so a resumed job sees the same images — stacks, scales and normalizes.

On a CPU this gives the worker path's batches bit for bit (tested); on a GPU the same images
within nvJPEG's rounding. The batch is decoded where ``FastPath.to_device`` meets it, so the
loop, validation, the thread probe and the dry run need nothing of their own.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision.transforms import v2

from shared.exceptions import DatasetError
from shared.spec import ImageFolderDataset
from worker.training.decode import DecodeError, ImageHeader, decode_images, peek_header, stack_images
from worker.training.images import _VisibleImageFolder
from worker.training.sources import TrainingData
from worker.training.transforms import SeededTransform, seeded_draws

#: File name endings of JPEGs, for ``decode: auto``.
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class EncodedImage:
    """One sample as a worker hands it over: the file, its header, its augmentation seed.

    Attributes:
        data: the whole file, 1-D uint8.
        header: :func:`decode.peek_header` of it (checked against ``MAX_IMAGE_PIXELS``).
        seed: the seed of its random transforms this epoch (``SeededTransform.sample_seed``).
        source: its URI, for errors (``s3://bucket/prefix/class/file.jpg``).
        train: a training sample (train transforms) or a validation one (eval transforms).
    """

    data: torch.Tensor
    header: ImageHeader
    seed: int
    source: str
    train: bool = True


@dataclass
class EncodedBatch:
    """A batch of encoded files: one uint8 buffer (one shared-memory block from a worker, one
    pinned block, one copy), the end offset of each file, their headers, seeds and sources.

    ``to(device)`` only records where the batch is to be decoded (the decoders read host
    memory); :class:`DecodeOnDevice` decodes it there.
    """

    buffer: torch.Tensor
    ends: list[int]
    headers: list[ImageHeader]
    seeds: list[int]
    sources: list[str]
    train: bool
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.ends)

    def files(self) -> list[torch.Tensor]:
        """Each file's bytes, views into :attr:`buffer`."""
        starts = [0, *self.ends[:-1]]
        return [self.buffer[start:end] for start, end in zip(starts, self.ends, strict=True)]

    def pin_memory(self) -> EncodedBatch:
        """The batch with its buffer in pinned memory (the DataLoader's ``pin_memory`` calls this)."""
        return replace(self, buffer=self.buffer.pin_memory())

    def to(self, device: torch.device) -> EncodedBatch:
        """The batch, to be decoded on ``device``."""
        return replace(self, device=torch.device(device))


def collate_encoded(batch: list[tuple[EncodedImage, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """``collate_fn`` for :class:`EncodedSamples`: ``(EncodedBatch, labels (batch,))``."""
    images = [image for image, _ in batch]
    lengths = torch.tensor([image.data.numel() for image in images])
    buffer = torch.cat([image.data for image in images])
    return (
        EncodedBatch(
            buffer=buffer, ends=lengths.cumsum(0).tolist(), headers=[image.header for image in images],
            seeds=[image.seed for image in images], sources=[image.source for image in images], train=images[0].train,
        ),
        torch.tensor([label for _, label in batch], dtype=torch.int64),
    )


class EncodedSamples(SeededTransform):
    """A :class:`SeededTransform` whose items are :class:`EncodedImage` (nothing decoded in the worker)."""

    def __init__(self, seeded: SeededTransform, train: bool) -> None:
        super().__init__(seeded.base, seeded.indices, seeded.transform, seeded.seed)
        self._epoch = seeded._epoch  # the same shared epoch counter: TrainingData.set_epoch sets it
        self.train = train

    def __getitem__(self, position: int) -> tuple[EncodedImage, int]:
        index = self.indices[position]
        folder, local = _locate(self.base, index)
        path, label = folder.samples[local]
        source = f"{folder.source_uri}/{folder.relative(path)}"
        data = Path(path).read_bytes()
        try:
            header = peek_header(data, folder.options.max_image_pixels)
        except DecodeError as exc:
            raise DatasetError(f"cannot read image {source}: {exc}") from exc
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), header, self.sample_seed(index), source, self.train), label


def _locate(base: Dataset, index: int) -> tuple[_VisibleImageFolder, int]:
    """The folder holding sample ``index`` of ``base`` (one folder or a ``ConcatDataset``) and its index there."""
    if isinstance(base, ConcatDataset):
        which = bisect.bisect_right(base.cumulative_sizes, index)
        return base.datasets[which], index - (base.cumulative_sizes[which - 1] if which else 0)
    return base, index


class DecodeOnDevice:
    """The data's ``finish`` for :class:`EncodedBatch` inputs: decode on the batch's device, run
    the train or eval transforms per image (seeded per sample), stack, then ``finish``
    (scale to [0, 1], normalize). Plain tensors only get ``finish``.

    Raises:
        DatasetError: a file no decoder can read, naming its URI.
    """

    def __init__(self, mode: str, train: v2.Compose, eval: v2.Compose, finish: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.mode, self.train, self.eval, self.finish = mode, train, eval, finish

    def __call__(self, batch: EncodedBatch | torch.Tensor) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return self.finish(batch)
        transform = self.train if batch.train else self.eval
        images = []
        for image, seed, source in zip(decode_images(batch.files(), batch.headers, self.mode, batch.device), batch.seeds,
                                       batch.sources, strict=True):
            if isinstance(image, DecodeError):
                raise DatasetError(f"cannot read image {source}: {image}") from image
            with seeded_draws(seed):
                images.append(transform(image))
        return self.finish(stack_images(images))


def decodes_on_device(spec: ImageFolderDataset, device: torch.device, data: TrainingData) -> bool:
    """Whether a job decodes on ``device`` (``dataset.decode``; ``auto``: on CUDA, every image a JPEG)."""
    if spec.decode != "auto":
        return spec.decode == "device"
    if device.type != "cuda":
        return False
    return all(path.lower().endswith(JPEG_SUFFIXES) for path in _paths(data.train.base))


def _paths(base: Dataset) -> list[str]:
    folders = base.datasets if isinstance(base, ConcatDataset) else [base]
    return [path for folder in folders for path, _ in folder.samples]


def on_device(data: TrainingData, spec: ImageFolderDataset, device: torch.device) -> TrainingData:
    """``data`` (of :func:`worker.training.images.load_image_folder`) decoding on ``device`` when
    :func:`decodes_on_device` says so, else ``data`` itself."""
    if not isinstance(data.train, SeededTransform) or not decodes_on_device(spec, device, data):
        return data
    mode = "L" if spec.channels == 1 else "RGB"
    return replace(
        data,
        train=EncodedSamples(data.train, train=True),
        val=EncodedSamples(data.val, train=False),
        collate=collate_encoded,
        finish=DecodeOnDevice(mode, data.train.transform, data.val.transform, data.finish),
    )
