"""The train/validation split and the per-class check, one rule for every dataset type.

A seeded random split can leave a rare class out of the training set (keras-team/keras#796):
an image folder ``a/`` 30, ``b/`` 30, ``rare/`` 2 with ``val_fraction: 0.3`` put both ``rare``
images in validation for seeds 1, 4 and 9, and the model never saw the class. A classification
split here is stratified, as scikit-learn's ``train_test_split(stratify=…)``: each class gives
its share of ``val_fraction`` (largest remainders make the total exact), and every class with at
least 2 samples has at least one in each split (in validation: as long as at least as many
samples are held out as there are such classes). A class of 1 sample trains.

Whatever the type (image folders, CSV tables) and however the split was made (``val_fraction``
or a separate ``val_uri``), :func:`check_class_counts` then refuses a class with no training
sample, in the same words.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from shared.exceptions import DatasetError


def split_indices(
    count: int, val_fraction: float, seed: int, uri: str, labels: Sequence[Hashable] | None = None
) -> tuple[list[int], list[int]]:
    """Seeded ``(train, val)`` index lists of ``count`` samples (sorted when stratified); the same
    seed gives the same split.

    ``max(1, round(count * val_fraction))`` samples are held out: drawn per class of ``labels``
    (one label per sample; a class of ``n ≥ 2`` samples holds out between 1 and ``n − 1`` while
    there are at least as many to hold out as such classes), or at random without labels (regression).

    Raises:
        DatasetError: fewer than 2 samples, naming ``uri``.
    """
    num_val = max(1, round(count * val_fraction))
    if count - num_val < 1:
        raise DatasetError(f"{uri} has {count} sample(s): too few to hold out a validation split")
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        order = torch.randperm(count, generator=generator).tolist()
        return order[num_val:], order[:num_val]  # as before stratification: a regression split is unchanged
    members: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    classes = sorted(members, key=str)  # a fixed order: the generator's draws follow it
    held = _held_out_per_class([len(members[c]) for c in classes], num_val, count)
    train, val = [], []
    for label, take in zip(classes, held, strict=True):
        indices = members[label]
        order = torch.randperm(len(indices), generator=generator).tolist()
        val += [indices[i] for i in order[:take]]
        train += [indices[i] for i in order[take:]]
    return sorted(train), sorted(val)


def _held_out_per_class(sizes: list[int], num_val: int, count: int) -> list[int]:
    """How many samples of each class (of ``sizes``) go to validation: the shares of ``num_val``
    by largest remainder, each within [1, n − 1] for a class of n ≥ 2 samples (within [0, n − 1]
    when ``num_val`` is smaller than the number of such classes), 0 for n = 1."""
    exact = [size * num_val / count for size in sizes]
    low = [1 if size >= 2 else 0 for size in sizes]
    if sum(low) > num_val:  # fewer held out than classes: the largest shares get one (none loses training)
        low = [0] * len(sizes)
    high = [size - 1 if size >= 2 else 0 for size in sizes]
    held = [min(max(math.floor(share), lo), hi) for share, lo, hi in zip(exact, low, high, strict=True)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (held[i] - exact[i], i))  # furthest below its share first
    for i in by_remainder:
        if sum(held) >= num_val:
            break
        if held[i] < high[i]:
            held[i] += 1
    for i in reversed(by_remainder):  # furthest above its share first
        if sum(held) <= num_val:
            break
        if held[i] > low[i]:
            held[i] -= 1
    return held


def class_counts(classes: list[str], labels: Sequence[int]) -> dict[str, int]:
    """Samples per class name, in class order, zeros included; ``labels`` are class indices."""
    counted = Counter(int(label) for label in labels)
    return {name: counted.get(index, 0) for index, name in enumerate(classes)}


def check_class_counts(
    classes: list[str], train_labels: Sequence[int], val_labels: Sequence[int], uri: str, shown: list[str] | None = None
) -> None:
    """Refuse a class that has no training sample (it would never be learned), for every dataset type.

    ``shown``: how the message names each class (default: its name quoted); a CSV names a class
    by the first line holding it, never by its value (a table may hold secrets).

    Raises:
        DatasetError: naming ``uri``, the classes and their validation counts.
    """
    train, val = class_counts(classes, train_labels), class_counts(classes, val_labels)
    shown = shown or [repr(name) for name in classes]
    missing = [index for index, name in enumerate(classes) if train[name] == 0]
    if missing:
        listed = ", ".join(f"{shown[i]} ({val[classes[i]]} in validation)" for i in missing[:10])
        raise DatasetError(
            f"{uri}: {len(missing)} class(es) have no training sample, so the model could never learn them: {listed}; "
            "add training samples of each class (with val_fraction, a class of 2 or more samples has one in each split)"
        )
