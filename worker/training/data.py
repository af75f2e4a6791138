"""Datasets from a spec, downloaded once per content: image folders and CSV tables from S3.

Image folders have torchvision's ``ImageFolder`` layout, ``<uri>/<class_name>/<image>``:
classes are the sub-folder names in sorted order, hidden folders and files are skipped
(``.ipynb_checkpoints``, ``.DS_Store``; pytorch/vision#2831), an empty class folder or an
unreadable image fails the job naming it (pytorch/vision#4925, #138).

Augmentations are seeded per sample from ``(seed, epoch, index)``, not by whichever DataLoader
worker happens to load the sample, so a resumed run sees exactly the images an uninterrupted
one would.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, TensorDataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from shared.exceptions import DatasetError, Interrupted
from shared.jobs import JobPhase
from shared.paths import check_tree_inside, printable, read_names, resolve_inside
from shared.settings import Settings
from shared.spec import CsvDataset, ImageFolderDataset, JobSpec, Transform
from shared.storage import ShouldStop, Storage, TransferProgress
from worker.faults import in_stage
from worker.training.split import check_class_counts, split_indices

#: The ``MAX_IMAGE_PIXELS`` setting's default (width × height), below Pillow's 89,478,485.
DEFAULT_MAX_IMAGE_PIXELS: int = Settings.model_fields["max_image_pixels"].default


@dataclass
class LoadOptions:
    """How :func:`load_data` checks images, reports progress and learns that it must stop.

    Attributes:
        max_image_pixels: an image with more pixels (width × height, read from its header
            before decoding) fails the job naming the file: a decompression bomb must not take
            the worker's memory.
        should_stop: asked between files while listing, downloading and verifying; a truthy
            answer (the reason) stops loading with :class:`shared.exceptions.Interrupted`.
        on_progress: ``(phase, files_done, files_total, bytes_done, bytes_total)`` while
            downloading (bytes known) and verifying (bytes None), about every 0.25 s.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    should_stop: ShouldStop | None = None
    on_progress: Callable[[JobPhase, int, int, int | None, int | None], None] | None = None

    def stop_if_asked(self) -> None:
        """Raise :class:`Interrupted` if :attr:`should_stop` answers a reason."""
        if self.should_stop is not None and (reason := self.should_stop()):
            raise Interrupted(reason)

    def report(self, phase: JobPhase, done: int, total: int, bytes_done: int | None = None, bytes_total: int | None = None) -> None:
        """Pass progress to :attr:`on_progress`, if any."""
        if self.on_progress is not None:
            self.on_progress(phase, done, total, bytes_done, bytes_total)

    def on_transfer(self, progress: TransferProgress) -> None:
        """:meth:`Storage.download_prefix`'s progress, as ``downloading``."""
        self.report(JobPhase.DOWNLOADING, progress.files_done, progress.files_total, progress.bytes_done, progress.bytes_total)


@dataclass
class TrainingData:
    """Train and validation sets of one job, and what the model needs to know about them.

    Image items are ``(image, label)``: a tensor ``(channels, image_size, image_size)``, uint8
    for 8-bit images or float in [0, 1] (see :func:`build_augment`), and an int class index;
    ``finish`` turns a batch of them, on the training device, into the model's float input.
    CSV items are ``(features, target)``: a float tensor ``(num_features,)`` and a class index
    (classification) or a float tensor ``(1,)``.

    Attributes:
        classes: class names in label-index order; empty for regression.
        input_shape: shape of one input, e.g. ``(3, 32, 32)`` or ``(10,)``.
        num_outputs: model outputs: the class count, or 1 for regression.
        metadata: stored in every checkpoint (e.g. the CSV's feature names, mean and std).
        collate: the DataLoader's ``collate_fn``.
        finish: applied to each batch's inputs once on the device (identity for CSV tables).
    """

    train: Dataset
    val: Dataset
    task: str
    classes: list[str]
    input_shape: tuple[int, ...]
    num_outputs: int
    metadata: dict[str, Any] = field(default_factory=dict)
    collate: Callable[[list[Any]], Any] = default_collate
    finish: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda inputs: inputs)

    def set_epoch(self, epoch: int) -> None:
        """Tell the training set which epoch is starting (it seeds augmentations by epoch)."""
        if isinstance(self.train, SeededTransform):
            self.train.epoch = epoch


LOCAL_SCHEME = "local://"


def resolve_local(uri: str, data_root: Path | None) -> Path:
    """The real path of a ``local://<path>`` URI inside ``data_root`` (symlinks resolved).

    Raises:
        DatasetError: no ``DATA_ROOT`` is configured, the path is not relative, or it leaves
            ``DATA_ROOT`` (``..``, a symlink out) or nothing is there — these two with one message.
    """
    if data_root is None:
        raise DatasetError(f"{uri}: this worker has no DATA_ROOT, so local datasets are refused")
    return resolve_inside(data_root, uri[len(LOCAL_SCHEME):], source=uri)


@in_stage("download")
def fetch_folder(uri: str, storage: Storage, cache_dir: Path, data_root: Path | None, options: LoadOptions | None = None) -> Path:
    """A local folder holding ``uri``'s files: the download cache for S3, the folder itself for local.

    Every entry of a local folder must lie inside ``DATA_ROOT`` (see
    :func:`shared.paths.check_tree_inside`).
    """
    if uri.startswith(LOCAL_SCHEME):
        path = resolve_local(uri, data_root)
        if not path.is_dir():
            raise DatasetError(f"{uri} is not a folder")
        check_tree_inside(path, data_root, source=uri)
        return path
    options = options or LoadOptions()
    return storage.download_prefix(uri, cache_dir, on_progress=options.on_transfer, should_stop=options.should_stop)


@in_stage("download")
def fetch_file(uri: str, storage: Storage, cache_dir: Path, data_root: Path | None, options: LoadOptions | None = None) -> Path:
    """A local copy (or the local file itself) of the object ``uri``."""
    if uri.startswith(LOCAL_SCHEME):
        path = resolve_local(uri, data_root)
        if not path.is_file():
            raise DatasetError(f"{uri} is not a file")
        return path
    options = options or LoadOptions()
    options.stop_if_asked()
    options.report(JobPhase.DOWNLOADING, 0, 1)
    path = storage.download_cached(uri, cache_dir)
    options.report(JobPhase.DOWNLOADING, 1, 1)
    return path


@in_stage("read data")
def load_data(
    spec: JobSpec, storage: Storage, cache_dir: Path, data_root: Path | None = None, options: LoadOptions | None = None
) -> TrainingData:
    """Download (or find under ``data_root``) and build the job's datasets.

    Raises:
        DatasetError: a prefix or file is missing or empty, a class has no image, an image or
            a row cannot be read, or the validation set does not match the training set.
        Interrupted: ``options.should_stop`` said so.
    """
    options = options or LoadOptions()
    if isinstance(spec.dataset, CsvDataset):
        return load_csv(spec.dataset, storage, cache_dir, spec.seed, data_root, options)
    return load_image_folder(spec.dataset, storage, cache_dir, spec.seed, data_root, options)


# -- image folders -----------------------------------------------------------------------------


class _VisibleImageFolder(ImageFolder):
    """``ImageFolder`` that ignores hidden folders and files, names bad files, returns PIL images.

    ``source_uri`` is used in error messages so a failure names the S3 object, not a cache path.
    ``class_index`` maps class names to label indices shared by several folders (the union of
    their classes); this folder's own classes must each hold at least one image.
    """

    def __init__(
        self, root: Path, source_uri: str, mode: str, class_index: dict[str, int], options: LoadOptions | None = None
    ) -> None:
        self.source_uri = source_uri.rstrip("/")
        self.root_path = root
        self.original_names = read_names(root)  # local path -> key, where a long name was shortened
        self.mode = mode
        self.class_index = class_index
        self.options = options or LoadOptions()
        try:
            super().__init__(str(root), loader=self._load, is_valid_file=self._is_valid)
        except FileNotFoundError as exc:  # "Found no valid file for the classes dog, bird. "
            raise DatasetError(f"{source_uri}: {str(exc).strip()} Images must end in {', '.join(IMG_EXTENSIONS)}.") from exc

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = visible_class_folders(Path(directory))
        return present, {name: self.class_index[name] for name in present}

    def _is_valid(self, path: str) -> bool:
        relative = Path(path).relative_to(self.root_path)
        return not any(part.startswith(".") for part in relative.parts) and path.lower().endswith(IMG_EXTENSIONS)

    def _load(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                _check_pixels(image, self.options.max_image_pixels)
                return to_mode(image, self.mode)
        except Exception as exc:  # PIL raises several types for truncated or non-image files
            raise DatasetError(f"cannot read image {self.source_uri}/{self.relative(path)}: {_without_path(str(exc), path)}") from exc

    def relative(self, path: str) -> str:
        """``path`` relative to the dataset root, as in the S3 key (never a worker-local path)."""
        relative = Path(path).relative_to(self.root_path).as_posix()
        return printable(self.original_names.get(relative, relative))

    @in_stage("decode")
    def verify(self, max_listed: int = 10) -> None:
        """Decode every image once; fail listing the unreadable ones (never train on gray pixels).

        The result is remembered in the content-keyed download folder, so unchanged data is
        checked once per worker. Decoding runs on 8 threads (PIL releases the GIL while decoding).

        Raises:
            DatasetError: naming up to ``max_listed`` unreadable files and how many there are.
        """
        # Remembered only in our own download cache, never written into a user's local folder.
        marker = self.root_path / ".verified" if (self.root_path / ".complete").exists() else None
        if marker is not None and marker.exists():
            return
        problems = _decode_problems([path for path, _ in self.samples], self.options, self.mode)
        if problems:
            listed = "; ".join(
                f"{self.source_uri}/{self.relative(path)} ({_without_path(error, path)})"
                for path, error in problems[:max_listed]
            )
            more = f" and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
            raise DatasetError(f"{len(problems)} unreadable image(s) in {self.source_uri}/: {listed}{more}")
        if marker is not None:
            marker.touch()


def _without_path(message: str, path: str) -> str:
    """``message`` with the worker-local ``path`` replaced by "it" (PIL and OSError name the file)."""
    return message.replace(repr(path), "it").replace(path, "it")


def visible_class_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


class ImageModeError(ValueError):
    """An image whose pixel mode or values cannot be scaled to [0, 1]; the message names the mode."""


#: Pillow modes of one channel with more than 8 bits, and the value that maps to 1.0: 16-bit
#: unsigned (any byte order) and 32-bit signed ``I``. ``I`` holds what 16-bit PNGs and TIFFs
#: opened as in older Pillow versions, so it is read as 16-bit: values must lie in 0..65535.
HIGH_BIT_MODES: dict[str, float] = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def to_mode(image: Image.Image, mode: str) -> Image.Image | torch.Tensor:
    """``image`` in ``mode`` (``"L"`` or ``"RGB"``), ready for :func:`build_transform`, which
    scales it to [0, 1].

    8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV…) are converted by Pillow and
    returned as a PIL image: alpha is dropped, a palette (with or without transparency) is looked
    up, CMYK/YCbCr/LAB/HSV become RGB, and grayscale is Pillow's ITU-R 601-2 luma. Modes with more
    bits become a float tensor ``(channels, H, W)`` already in [0, 1]: 16-bit (``I;16``, ``I;16B``,
    and ``I``) divided by 65535, 32-bit float ``F`` taken as is.

    Raises:
        ImageModeError: ``I`` with values outside 0..65535, ``F`` with values outside [0, 1]
            (or NaN), or a mode Pillow cannot convert (e.g. premultiplied ``La``); the message
            names the mode (the caller names the file).
    """
    channels = 1 if mode == "L" else 3
    if image.mode in HIGH_BIT_MODES or image.mode == "F":
        pixels = np.asarray(image)
        values = pixels.astype(np.float32) / HIGH_BIT_MODES.get(image.mode, 1.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ImageModeError(
                f"mode {image.mode!r} pixel values span {float(pixels.min()):g}..{float(pixels.max()):g}; "
                f"expected {'0..65535' if image.mode == 'I' else '0..1'}: rescale the file to 8 or 16 bits"
            )
        return torch.from_numpy(values).unsqueeze(0).expand(channels, -1, -1).contiguous()
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
        image = image.convert("RGBA")  # as Pillow recommends, so the palette is not mangled
    elif image.mode in ("LAB",) and mode == "L":
        image = image.convert("RGB")  # Pillow has no LAB → L
    try:
        return image.convert(mode)
    except ValueError as exc:
        raise ImageModeError(f"mode {image.mode!r} cannot be converted to {mode} ({exc})") from exc


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Refuse an image larger than ``max_pixels`` from its header, before decoding it.

    Raises:
        ValueError: naming the size and the ``MAX_IMAGE_PIXELS`` limit.
    """
    if image.width * image.height > max_pixels:
        raise ValueError(
            f"{image.width}x{image.height} = {image.width * image.height:,} pixels is more than MAX_IMAGE_PIXELS ({max_pixels:,})"
        )


def _decode_problem(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, mode: str = "RGB") -> tuple[str, str] | None:
    try:
        with Image.open(path) as image:
            _check_pixels(image, max_pixels)
            image.load()  # a full decode: catches truncated files, not just bad headers
            to_mode(image, mode)  # and a mode or value range that cannot be scaled to [0, 1]
    except Exception as exc:
        return path, f"{type(exc).__name__}: {exc}"
    return None


def _decode_problems(paths: list[str], options: LoadOptions, mode: str = "RGB", threads: int = 8) -> list[tuple[str, str]]:
    """Decode every file of ``paths`` on ``threads`` threads (PIL releases the GIL while decoding)
    and check it converts to ``mode`` with values in [0, 1]; return ``(path, error)`` of the
    unreadable ones, in ``paths`` order.

    At most ``4 * threads`` decodes are queued at a time, so a stop (``options.should_stop``,
    asked as decodes finish and every 0.25 s) waits for a few images only.

    Raises:
        Interrupted: ``options.should_stop`` said so.
    """
    problems: dict[int, tuple[str, str]] = {}
    pending: dict[Any, int] = {}
    done, total = 0, len(paths)
    queued = iter(enumerate(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            while True:
                for index, path in queued:
                    pending[pool.submit(_decode_problem, path, options.max_image_pixels, mode)] = index
                    if len(pending) >= 4 * threads:
                        break
                if not pending:
                    break
                finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    if (problem := future.result()) is not None:
                        problems[index] = problem
                done += len(finished)
                options.stop_if_asked()
                options.report(JobPhase.VERIFYING, done, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [problems[index] for index in sorted(problems)]


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
    for 8-bit images, float in [0, 1] for 16-bit and float ones (see :func:`to_mode`). A uint8
    batch is a quarter of the bytes of a float32 one through shared memory, pinning and the
    host-to-device copy: at 224 px, 150 KB an image instead of 602 KB. timm's ``PrefetchLoader``
    and NVIDIA's DALI examples normalize on the GPU for the same reason.
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
    if len({image.dtype for image, _ in batch}) > 1:
        batch = [(v2.functional.to_dtype(image, torch.float32, scale=True), label) for image, label in batch]
    return default_collate(batch)


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
        # torchvision's random transforms draw from the CPU generator. Seed only that one and put
        # its state back: torch.manual_seed + fork_rng also touch every accelerator's generator
        # and cost ~140 µs a sample, more than decoding an 8x8 PNG (bench/README.md).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
        try:
            return self.transform(image), label
        finally:
            generator.set_state(state)


def _image_folders(
    uris: list[str], storage: Storage, cache_dir: Path, mode: str, data_root: Path | None, options: LoadOptions | None = None,
    also: list[str] = (),
) -> tuple[Dataset, list[str]]:
    """The image folders of ``uris`` as one dataset, and the class names: those of their folders and ``also``."""
    roots = [(uri, fetch_folder(uri, storage, cache_dir, data_root, options)) for uri in uris]
    classes = sorted({name for _, root in roots for name in visible_class_folders(root)})
    if not classes:
        raise DatasetError(f"no class folders under {', '.join(uris)} (expected <class_name>/<image> files)")
    classes = sorted(set(classes) | set(also))
    index = {name: i for i, name in enumerate(classes)}
    folders = [_VisibleImageFolder(root, uri, mode, index, options) for uri, root in roots]
    for folder in folders:
        folder.verify()
    return (folders[0] if len(folders) == 1 else ConcatDataset(folders)), classes


def load_image_folder(
    spec: ImageFolderDataset,
    storage: Storage,
    cache_dir: Path,
    seed: int,
    data_root: Path | None = None,
    options: LoadOptions | None = None,
) -> TrainingData:
    """Download ``spec.uri`` (with ``extra_uris``, and ``val_uri``) and build train/val sets.

    Without ``val_uri``, a seeded ``val_fraction`` of the images (at least one) is held out,
    per class (:func:`worker.training.split.split_indices`); the same seed always gives the same split.

    Raises:
        DatasetError: as :func:`load_data`, fewer than 2 classes, or a class with no training image.
    """
    mode = "L" if spec.channels == 1 else "RGB"
    uris = [spec.uri, *spec.extra_uris]
    # Classes of both sets: one the validation set lacks is fine, one the training set lacks is
    # refused below in the words a CSV gets (check_class_counts).
    val_classes = visible_class_folders(fetch_folder(spec.val_uri, storage, cache_dir, data_root, options)) if spec.val_uri else []
    full, classes = _image_folders(uris, storage, cache_dir, mode, data_root, options, also=val_classes)
    if len(classes) < 2:
        raise DatasetError(f"{spec.uri} has {len(classes)} class folder(s) {classes}; classification needs at least 2")
    train_transform = build_augment(spec.train_transforms, spec)
    eval_transform = build_augment(spec.eval_transforms, spec)
    if spec.val_uri is not None:
        val_full, _ = _image_folders([spec.val_uri], storage, cache_dir, mode, data_root, options, also=classes)
        train_indices, val = list(range(len(full))), SeededTransform(val_full, list(range(len(val_full))), eval_transform, seed)
    else:
        train_indices, val_indices = _split(len(full), spec.val_fraction, seed, spec.uri, labels=_folder_targets(full))
        val = SeededTransform(full, val_indices, eval_transform, seed)
    train = SeededTransform(full, train_indices, train_transform, seed)
    check_class_counts(classes, dataset_labels(train), dataset_labels(val), spec.uri)
    return TrainingData(
        train=train,
        val=val,
        task="classification",
        classes=classes,
        input_shape=(spec.channels, spec.image_size, spec.image_size),
        num_outputs=len(classes),
        collate=collate_images,
        finish=build_finish(spec),
    )


def _split(count: int, val_fraction: float, seed: int, uri: str, labels: list | None = None) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists, stratified by ``labels`` when given (:mod:`worker.training.split`)."""
    return split_indices(count, val_fraction, seed, uri, labels)


def _folder_targets(dataset: Dataset) -> list[int]:
    """Class indices of an ImageFolder or a ConcatDataset of them, in index order (no decoding)."""
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [target for folder in dataset.datasets for target in folder.targets]


def dataset_labels(dataset: Dataset) -> list[int]:
    """Class indices of a classification set of :class:`TrainingData` (``train`` or ``val``),
    without decoding a sample: a CSV's TensorDataset or a SeededTransform over image folders."""
    if hasattr(dataset, "tensors"):
        return [int(label) for label in dataset.tensors[1].flatten().tolist()]
    targets = _folder_targets(dataset.base)
    return [targets[index] for index in dataset.indices]


# -- CSV tables ----------------------------------------------------------------------------------


def _read_csv(path: Path, uri: str, spec: CsvDataset, features: list[str] | None) -> tuple[list[str], list[list[float]], list[str]]:
    """Feature names, feature rows and raw target strings of one CSV file."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if spec.target not in header:
            raise DatasetError(f"{uri}: no column {spec.target!r} (dataset.target); columns are {header}", field="dataset.target")
        names = features or spec.features or [name for name in header if name != spec.target]
        missing = [name for name in names if name not in header]
        if missing:
            raise DatasetError(f"{uri}: no column(s) {missing} (dataset.features); columns are {header}", field="dataset.features")
        rows, targets = [], []
        for record in reader:
            line = reader.line_num  # the physical line (a quoted cell may span several)
            if None in record or None in record.values():  # csv.DictReader's extra / missing fields
                fields = len(header) + len(record.get(None) or []) - sum(value is None for value in record.values())
                raise DatasetError(f"{uri} line {line} has {fields} field(s); the header has {len(header)}")
            if record[spec.target] == "":
                raise DatasetError(f"{uri} line {line}: column {spec.target!r} (dataset.target) is empty")
            try:
                values = [float(record[name]) for name in names]
            except (TypeError, ValueError):
                bad = next(name for name in names if not _is_number(record[name]))
                # The cell's value is never quoted: a table may hold secrets (issue 7).
                raise DatasetError(f"{uri} line {line}: column {bad!r} is not a number") from None
            if not all(math.isfinite(value) for value in values):
                raise DatasetError(f"{uri} line {line}: a feature is NaN or infinite")
            rows.append(values)
            targets.append(record[spec.target])
    if not rows:
        raise DatasetError(f"{uri} has no data rows")
    return names, rows, targets


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _targets(raw: list[str], spec: CsvDataset, classes: list[str], uri: str, lines: list[int]) -> torch.Tensor:
    """Class indices ``(rows,)`` or regression targets ``(rows, 1)``; ``lines`` are the rows' CSV lines.

    Errors name the column and line, never a cell's value.
    """
    if spec.task == "classification":
        index = {name: i for i, name in enumerate(classes)}
        unknown = [line for value, line in zip(raw, lines, strict=True) if value not in index]
        if unknown:
            raise DatasetError(
                f"{uri} line {min(unknown)}: the value of target {spec.target!r} is not a class of the training set "
                f"({len(unknown)} row(s) like it)"
            )
        return torch.tensor([index[value] for value in raw], dtype=torch.long)
    bad = [line for value, line in zip(raw, lines, strict=True) if not _is_number(value) or not math.isfinite(float(value))]
    if bad:
        raise DatasetError(f"{uri} line {min(bad)}: target {spec.target!r} is not a finite number, as a regression target must be")
    return torch.tensor([float(value) for value in raw], dtype=torch.float32).unsqueeze(1)


def load_csv(
    spec: CsvDataset, storage: Storage, cache_dir: Path, seed: int, data_root: Path | None = None, options: LoadOptions | None = None
) -> TrainingData:
    """Download and parse the CSV(s); standardize features with the training split's statistics.

    Raises:
        DatasetError: a missing file, column or class, a non-numeric feature or regression
            target (naming the line and column), or too few rows.
    """
    names, rows, raw = _read_csv(fetch_file(spec.uri, storage, cache_dir, data_root, options), spec.uri, spec, None)
    features = torch.tensor(rows, dtype=torch.float32)
    if spec.val_uri is not None:
        _, val_rows, val_raw = _read_csv(fetch_file(spec.val_uri, storage, cache_dir, data_root, options), spec.val_uri, spec, names)
        train_x, train_raw = features, raw
        val_x = torch.tensor(val_rows, dtype=torch.float32)
        train_lines, val_lines = [i + 2 for i in range(len(raw))], [i + 2 for i in range(len(val_raw))]
    else:
        labels = raw if spec.task == "classification" else None
        train_idx, val_idx = _split(len(rows), spec.val_fraction, seed, spec.uri, labels=labels)
        train_x, val_x = features[train_idx], features[val_idx]
        train_raw, val_raw = [raw[i] for i in train_idx], [raw[i] for i in val_idx]
        train_lines, val_lines = [i + 2 for i in train_idx], [i + 2 for i in val_idx]
    # Every class either split names; a class with no training row is refused below, in the words
    # an image folder gets (check_class_counts).
    classes = sorted(set(train_raw) | set(val_raw)) if spec.task == "classification" else []
    if spec.task == "classification" and len(classes) < 2:
        raise DatasetError(f"{spec.uri}: target {spec.target!r} has {len(classes)} distinct value(s); classification needs at least 2")
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False).clamp_min(1e-12)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)  # constant columns stay as they are
    train_y = _targets(train_raw, spec, classes, spec.uri, train_lines)
    val_y = _targets(val_raw, spec, classes, spec.val_uri or spec.uri, val_lines)
    if classes:
        first_val_line = {}
        for value, line in zip(val_raw, val_lines, strict=True):
            first_val_line.setdefault(value, line)
        shown = [f"the target at {spec.val_uri or spec.uri} line {first_val_line.get(name, '?')}" for name in classes]
        check_class_counts(classes, train_y.tolist(), val_y.tolist(), spec.uri, shown)
    return TrainingData(
        train=TensorDataset((train_x - mean) / std, train_y),
        val=TensorDataset((val_x - mean) / std, val_y),
        task=spec.task,
        classes=classes,
        input_shape=(len(names),),
        num_outputs=len(classes) if classes else 1,
        metadata={"features": names, "feature_mean": mean.tolist(), "feature_std": std.tolist()},
    )
