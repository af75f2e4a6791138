"""The stratified split (worker/training/split.py): exact totals, every class of 2 or more in both splits."""

from __future__ import annotations

from collections import Counter

import pytest

from shared.exceptions import DatasetError
from worker.training.split import split_indices


@pytest.mark.parametrize(
    ("sizes", "val_fraction"),
    [({"a": 30, "b": 30, "rare": 2}, 0.3), ({"a": 178, "b": 182, "c": 177}, 0.2), ({"x": 1, "y": 2, "z": 97}, 0.5),
     ({f"c{i}": 2 for i in range(10)}, 0.1), ({"a": 5, "b": 3}, 0.9), ({f"c{i}": 2 for i in range(10)}, 0.3)],
)
@pytest.mark.parametrize("seed", range(5))
def test_each_class_of_2_or_more_has_a_sample_in_each_split(sizes: dict[str, int], val_fraction: float, seed: int):
    labels = [name for name, size in sizes.items() for _ in range(size)]
    train, val = split_indices(len(labels), val_fraction, seed, "s3://x/", labels)
    assert sorted(train + val) == list(range(len(labels)))
    train_counts, val_counts = Counter(labels[i] for i in train), Counter(labels[i] for i in val)
    wanted = max(1, round(len(labels) * val_fraction))
    assert len(val) == min(wanted, len(labels) - len(sizes))  # every class keeps a training sample
    for name, size in sizes.items():
        assert train_counts[name] >= 1  # every class trains
        if size >= 2 and wanted >= sum(1 for n in sizes.values() if n >= 2):
            assert val_counts[name] >= 1, (name, train_counts, val_counts)


def test_fewer_held_out_than_classes_never_takes_a_class_out_of_training():
    labels = ["cat"] * 3 + ["dog"] * 2
    train, val = split_indices(5, 0.2, 0, "u", labels)
    assert len(val) == 1 and {labels[i] for i in train} == {"cat", "dog"}


def test_the_split_is_seeded():
    labels = ["a"] * 20 + ["b"] * 20
    assert split_indices(40, 0.25, 7, "u", labels) == split_indices(40, 0.25, 7, "u", labels) != split_indices(40, 0.25, 8, "u", labels)
    assert split_indices(40, 0.25, 7, "u") == split_indices(40, 0.25, 7, "u")  # regression: no labels


def test_one_sample_is_too_few():
    with pytest.raises(DatasetError, match="s3://x/ has 1 sample"):
        split_indices(1, 0.2, 0, "s3://x/", ["a"])
