"""Where a job's data comes from and what loading it gives: options, the datasets, fetching from S3 or DATA_ROOT.

The base of the data modules (:mod:`worker.training.images`, :mod:`worker.training.tables`,
:mod:`worker.training.data`): files are downloaded once per content into the cache; a
``local://`` URI is confined to ``DATA_ROOT``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from shared.exceptions import DatasetError, Interrupted
from shared.paths import check_tree_inside, resolve_inside
from shared.records import JobPhase
from shared.settings import Settings
from shared.spec import Loc
from shared.storage import ShouldStop, Storage, TransferProgress
from worker.faults import in_stage
from worker.training.transforms import SeededTransform

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
        finish: applied to each batch's inputs once on the device (identity for CSV tables; with
            ``dataset.decode: device`` it decodes and augments too: :mod:`worker.training.device_data`).
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


@contextmanager
def blaming(field: str | Loc) -> Iterator[None]:
    """Set ``field`` (a dotted path or a JSON path) on a :class:`DatasetError` raised inside
    that names no field yet: the data at fault is that field's."""
    try:
        yield
    except DatasetError as exc:
        exc.field = exc.field or (field if isinstance(field, str) else ".".join(map(str, field)))
        raise


def folder_targets(dataset: Dataset) -> list[int]:
    """Class indices of an ImageFolder or a ConcatDataset of them, in index order (no decoding)."""
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [target for folder in dataset.datasets for target in folder.targets]


def dataset_labels(dataset: Dataset) -> list[int]:
    """Class indices of a classification set of :class:`TrainingData` (``train`` or ``val``),
    without decoding a sample: a CSV's TensorDataset or a SeededTransform over image folders."""
    if hasattr(dataset, "tensors"):
        return [int(label) for label in dataset.tensors[1].flatten().tolist()]
    targets = folder_targets(dataset.base)
    return [targets[index] for index in dataset.indices]
