"""Image folders: torchvision's ``ImageFolder`` layout, ``<uri>/<class_name>/<image>``.

Classes are the sub-folder names in sorted order, hidden folders and files are skipped
(``.ipynb_checkpoints``, ``.DS_Store``; pytorch/vision#2831), an empty class folder or an
unreadable image fails the job naming it (pytorch/vision#4925, #138).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from shared.exceptions import DatasetError
from shared.paths import printable, read_names
from shared.records import JobPhase
from shared.spec import ImageFolderDataset, Loc
from shared.storage import Storage
from worker.faults import in_stage
from worker.training.decode import DecodeError, ImageModeError, decode_file
from worker.training.sources import (
    DEFAULT_MAX_IMAGE_PIXELS, LoadOptions, TrainingData, blaming, dataset_labels, fetch_folder, folder_targets,
)
from worker.training.split import check_class_counts, split_indices
from worker.training.transforms import SeededTransform, build_augment, build_finish, collate_images


class _VisibleImageFolder(ImageFolder):
    """``ImageFolder`` that ignores hidden folders and files, names bad files, returns the decoding
    contract's tensors (:func:`worker.training.decode.image_to_tensor`: EXIF orientation applied).

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

    def _load(self, path: str) -> torch.Tensor:
        try:
            return decode_file(path, self.mode, self.options.max_image_pixels)
        except DecodeError as exc:
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


def _decode_problem(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, mode: str = "RGB") -> tuple[str, str] | None:
    try:
        decode_file(path, mode, max_pixels)  # a full decode: catches truncated files and unscalable modes
    except DecodeError as exc:
        cause = exc if isinstance(exc, ImageModeError) or exc.__cause__ is None else exc.__cause__
        return path, f"{type(cause).__name__}: {cause}"
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


def _image_folders(
    uris: list[tuple[Loc, str]], storage: Storage, cache_dir: Path, mode: str, data_root: Path | None,
    options: LoadOptions | None = None, also: Sequence[str] = (),
) -> tuple[Dataset, list[str]]:
    """The image folders of ``uris`` as one dataset, and the class names: those of their folders and ``also``."""
    roots = []
    for loc, uri in uris:
        with blaming(loc):
            roots.append((loc, uri, fetch_folder(uri, storage, cache_dir, data_root, options)))
    classes = sorted({name for _, _, root in roots for name in visible_class_folders(root)})
    if not classes:
        raise DatasetError(
            f"no class folders under {', '.join(uri for _, uri in uris)} (expected <class_name>/<image> files)",
            field=".".join(map(str, uris[0][0])),
        )
    classes = sorted(set(classes) | set(also))
    index = {name: i for i, name in enumerate(classes)}
    folders = []
    for loc, uri, root in roots:
        with blaming(loc):
            folders.append(_VisibleImageFolder(root, uri, mode, index, options))
    for (loc, _, _), folder in zip(roots, folders, strict=True):
        with blaming(loc):
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
    val_loc = (("dataset", "val_uri"), spec.val_uri)
    # Classes of both sets: one the validation set lacks is fine, one the training set lacks is
    # refused below in the words a CSV gets (check_class_counts).
    val_classes: list[str] = []
    if spec.val_uri is not None:
        with blaming(val_loc[0]):
            val_classes = visible_class_folders(fetch_folder(spec.val_uri, storage, cache_dir, data_root, options))
    full, classes = _image_folders(spec.training_uris(), storage, cache_dir, mode, data_root, options, also=val_classes)
    if len(classes) < 2:
        raise DatasetError(f"{spec.uri} has {len(classes)} class folder(s) {classes}; classification needs at least 2")
    train_transform = build_augment(spec.train_transforms, spec)
    eval_transform = build_augment(spec.eval_transforms, spec)
    if spec.val_uri is not None:
        val_full, _ = _image_folders([val_loc], storage, cache_dir, mode, data_root, options, also=classes)
        train_indices, val = list(range(len(full))), SeededTransform(val_full, list(range(len(val_full))), eval_transform, seed)
    else:
        train_indices, val_indices = split_indices(len(full), spec.val_fraction, seed, spec.uri, labels=folder_targets(full))
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
