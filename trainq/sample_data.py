"""Real sample data that ships in a package (no downloads): scikit-learn's digits, diabetes and sample photos.

Digits are materialized as an image folder (``<root>/<digit>/<index>.png``), the layout of
trainq's ``image_folder`` dataset; both sets can also be written as CSV tables for the ``csv``
dataset. Used by the demo and the tests.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, *, limit: int | None = None) -> dict[str, int]:
    """Write scikit-learn's digits as 8×8 grayscale PNGs under ``root/<digit>/``.

    The 1,797 images (Alpaydin & Kaynak, UCI "Optical Recognition of Handwritten Digits") have
    pixel values 0..16; they are scaled to 0..255. ``limit`` keeps only the first N images.

    Returns:
        Images written per class name, e.g. ``{"0": 178, ..., "9": 180}``.
    """
    from sklearn.datasets import load_digits  # local extra only; the service does not need it

    digits = load_digits()
    images = digits.images[:limit] if limit else digits.images
    targets = digits.target[: len(images)]
    counts: dict[str, int] = {}
    for index, (pixels, target) in enumerate(zip(images, targets, strict=True)):
        name = str(int(target))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        array = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(array, mode="L").save(folder / f"{index:04d}.png")
        counts[name] = counts.get(name, 0) + 1
    return counts


def write_table(path: Path, name: str) -> tuple[list[str], str]:
    """Write scikit-learn's ``diabetes`` (442 rows, 10 features, a numeric target: regression) or
    ``digits`` (1,797 rows, 64 pixel features, a digit label: classification) as a CSV file.

    Returns:
        ``(feature column names, target column name)``.
    """
    from sklearn.datasets import load_diabetes, load_digits

    bunch = {"diabetes": load_diabetes, "digits": load_digits}[name]()
    features = [str(f) for f in bunch.feature_names]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*features, "target"])
        for row, target in zip(bunch.data, bunch.target, strict=True):
            writer.writerow([*(f"{value:.6g}" for value in row), int(target) if name == "digits" else f"{target:g}"])
    return features, "target"


def write_photo_folder(root: Path, count: int = 2000, size: tuple[int, int] = (500, 375), seed: int = 0) -> dict[str, int]:
    """Write ``count`` JPEG photos of about ``size`` (width, height) pixels under ``root/<class>/``.

    Each is a crop of one of scikit-learn's two sample photos (``load_sample_images``:
    ``china.jpg`` and ``flower.jpg``, 640×427 RGB) at a random position, covering 40–100% of each
    side, resized to ``size`` give or take 10% a side (bicubic), mirrored half of the time, and
    saved at JPEG quality 90 (about 30–60 kB): a stand-in for a folder of camera photos whose
    decoding costs what real ones do. The class is the source photo (``china``, ``flower``),
    alternating. The same ``seed`` writes the same files.

    Returns:
        Images written per class name, e.g. ``{"china": 1000, "flower": 1000}``.
    """
    from sklearn.datasets import load_sample_images  # local extra only; the service does not need it

    bunch = load_sample_images()
    sources = {Path(name).stem: Image.fromarray(pixels) for name, pixels in zip(bunch.filenames, bunch.images, strict=True)}
    names = sorted(sources)
    rng = np.random.default_rng(seed)
    jobs = []  # drawn in order, so the files do not depend on the threads
    for index in range(count):
        name = names[index % len(names)]
        photo = sources[name]
        crop_w = int(photo.width * rng.uniform(0.4, 1.0))
        crop_h = int(photo.height * rng.uniform(0.4, 1.0))
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        out = tuple(max(1, round(side * rng.uniform(0.9, 1.1))) for side in size)
        jobs.append((root / name / f"{index:05d}.jpg", photo, (left, top, left + crop_w, top + crop_h), out, rng.random() < 0.5))

    def write(job: tuple) -> None:
        path, photo, box, out, mirror = job
        image = photo.crop(box).resize(out, Image.Resampling.BICUBIC)
        if mirror:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(path, quality=90)

    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=8) as pool:  # PIL releases the GIL while resizing and encoding
        list(pool.map(write, jobs))
    counts: dict[str, int] = {}
    for path, *_ in jobs:
        counts[path.parent.name] = counts.get(path.parent.name, 0) + 1
    return counts
