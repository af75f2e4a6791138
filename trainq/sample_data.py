"""Real sample data that ships in a package (no downloads): scikit-learn's digits and diabetes.

Digits are materialized as an image folder (``<root>/<digit>/<index>.png``), the layout of
trainq's ``image_folder`` dataset; both sets can also be written as CSV tables for the ``csv``
dataset. Used by the demo and the tests.
"""

from __future__ import annotations

import csv
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


def write_photo_folder(root: Path, count: int = 2000, size: tuple[int, int] = (500, 375), *, seed: int = 0) -> dict[str, int]:
    """Write ``count`` JPEGs of about ``size`` (width, height) px cut from scikit-learn's two sample
    photos (``china.jpg``, ``flower.jpg``, 640×427) as an image folder with the classes ``china``
    and ``flower``: random crops of 60–100% of each side, resized to ``size`` ± 10%, quality 90.

    A real-photo folder for throughput benchmarks (decode and transform costs of ~500×375 JPEGs,
    the size of many ImageNet images) without downloads.

    Returns:
        Images written per class.
    """
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for index in range(count):
        which = index % len(bunch.images)
        name = Path(bunch.filenames[which]).stem
        photo = bunch.images[which]
        height, width = photo.shape[:2]
        crop_h, crop_w = (int(side * rng.uniform(0.6, 1.0)) for side in (height, width))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        out_w, out_h = (int(side * rng.uniform(0.9, 1.1)) for side in size)
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize((out_w, out_h), Image.BILINEAR)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=90)
        counts[name] = counts.get(name, 0) + 1
    return counts
