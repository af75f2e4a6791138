"""Real sample data that ships in a package (no downloads): scikit-learn's handwritten digits.

Materialized as an image folder (``<root>/<digit>/<index>.png``), the layout trainq's
``image_folder`` dataset reads, and uploaded to S3 for the demo and the tests.
"""

from __future__ import annotations

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
