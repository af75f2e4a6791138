"""Datasets from a spec: an image folder under an S3 prefix, downloaded once per content.

Layout ``<uri>/<class_name>/<image>``, as torchvision's ``ImageFolder``: classes are the
sub-folder names in sorted order, hidden folders and files are skipped
(``.ipynb_checkpoints``, ``.DS_Store``; pytorch/vision#2831).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from shared.exceptions import DatasetError
from shared.spec import ImageFolderDataset
from shared.storage import Storage


@dataclass
class ImageData:
    """Train and validation datasets with their class names (index ``i`` is ``classes[i]``).

    Each item is ``(image, label)``: a float tensor ``(channels, image_size, image_size)`` in
    [0, 1] and an int class index.
    """

    train: Dataset
    val: Dataset
    classes: list[str]


class _VisibleImageFolder(ImageFolder):
    """``ImageFolder`` that ignores hidden class folders and hidden files, and names bad files.

    ``source_uri`` is used in error messages so a failure names the S3 object, not a cache path.
    """

    def __init__(self, root: Path, source_uri: str, mode: str, transform: v2.Transform) -> None:
        self.source_uri = source_uri.rstrip("/")
        self.root_path = root
        self.mode = mode
        super().__init__(str(root), transform=transform, loader=self._load, is_valid_file=self._is_valid)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(
            entry.name for entry in Path(directory).iterdir() if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise DatasetError(f"no class folders under {self.source_uri}/ (expected <class_name>/<image> files)")
        return classes, {name: index for index, name in enumerate(classes)}

    def _is_valid(self, path: str) -> bool:
        relative = Path(path).relative_to(self.root_path)
        return not any(part.startswith(".") for part in relative.parts) and path.lower().endswith(IMG_EXTENSIONS)

    def _load(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return to_mode(image, self.mode)
        except Exception as exc:  # PIL raises several types for truncated or non-image files
            raise DatasetError(f"cannot read image {self.source_uri}/{self.relative(path)}: {exc}") from exc

    def relative(self, path: str) -> str:
        """``path`` relative to the dataset root, as in the S3 key."""
        return Path(path).relative_to(self.root_path).as_posix()

    def verify(self, max_listed: int = 10) -> None:
        """Decode every image once; fail listing the unreadable ones (never train on gray pixels).

        The result is remembered in the content-keyed download folder, so unchanged data is
        checked once per worker. Decoding runs on 8 threads (PIL releases the GIL while decoding).

        Raises:
            DatasetError: naming up to ``max_listed`` unreadable files and how many there are.
        """
        marker = self.root_path / ".verified"
        if marker.exists():
            return
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = [p for p in pool.map(_decode_problem, (path for path, _ in self.samples)) if p]
        if problems:
            listed = "; ".join(
                f"{self.source_uri}/{self.relative(path)} ({error.replace(repr(path), 'it').replace(path, 'it')})"
                for path, error in problems[:max_listed]
            )
            more = f" and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
            raise DatasetError(f"{len(problems)} unreadable image(s) in {self.source_uri}/: {listed}{more}")
        marker.touch()


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image (RGB, L, 1-bit, P with transparency, RGBA, CMYK…) to ``mode``.

    A palette image with a transparent colour goes through RGBA first, as PIL recommends, so
    its colours are not mangled.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert(mode)


def _decode_problem(path: str) -> tuple[str, str] | None:
    try:
        with Image.open(path) as image:
            image.load()  # a full decode: catches truncated files, not just bad headers
    except Exception as exc:
        return path, f"{type(exc).__name__}: {exc}"
    return None


def _image_folder(root: Path, uri: str, spec: ImageFolderDataset) -> _VisibleImageFolder:
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((spec.image_size, spec.image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    mode = "L" if spec.channels == 1 else "RGB"
    try:
        dataset = _VisibleImageFolder(root, uri, mode, transform)
    except FileNotFoundError as exc:  # ImageFolder: "Found no valid file for the classes dog, bird. "
        raise DatasetError(f"{uri}: {str(exc).strip()} Images must end in {', '.join(IMG_EXTENSIONS)}.") from exc
    if len(dataset.classes) < 2:
        raise DatasetError(f"{uri} has {len(dataset.classes)} class folder(s) {dataset.classes}; classification needs at least 2")
    dataset.verify()
    return dataset


def load_image_folder(spec: ImageFolderDataset, storage: Storage, cache_dir: Path, seed: int) -> ImageData:
    """Download ``spec.uri`` (and ``spec.val_uri``) and build the train/validation datasets.

    Without ``val_uri``, a seeded random ``val_fraction`` of the images (at least one) is held
    out; the same seed always gives the same split.

    Raises:
        DatasetError: a prefix is empty or missing, a class folder has no image, the validation
            classes differ from the training classes, or too few images to split.
    """
    train_root = storage.download_prefix(spec.uri, cache_dir)
    train_full = _image_folder(train_root, spec.uri, spec)
    classes = train_full.classes
    if spec.val_uri is not None:
        val_root = storage.download_prefix(spec.val_uri, cache_dir)
        val = _image_folder(val_root, spec.val_uri, spec)
        if val.classes != classes:
            raise DatasetError(
                f"classes of {spec.val_uri} {val.classes} differ from those of {spec.uri} {classes}"
            )
        return ImageData(train=train_full, val=val, classes=classes)
    count = len(train_full)
    num_val = max(1, round(count * spec.val_fraction))
    if count - num_val < 1:
        raise DatasetError(f"{spec.uri} has {count} image(s): too few to hold out a validation split")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return ImageData(
        train=Subset(train_full, order[num_val:]),
        val=Subset(train_full, order[:num_val]),
        classes=classes,
    )
