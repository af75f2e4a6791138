"""CSV tables: numeric features and a target column, standardized with the training split's statistics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from shared.exceptions import DatasetError
from shared.spec import CsvDataset
from shared.storage import Storage
from worker.training.sources import LoadOptions, TrainingData, blaming, fetch_file
from worker.training.split import check_class_counts, split_indices

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
        with blaming("dataset.val_uri"):
            _, val_rows, val_raw = _read_csv(fetch_file(spec.val_uri, storage, cache_dir, data_root, options), spec.val_uri, spec, names)
        train_x, train_raw = features, raw
        val_x = torch.tensor(val_rows, dtype=torch.float32)
        train_lines, val_lines = [i + 2 for i in range(len(raw))], [i + 2 for i in range(len(val_raw))]
    else:
        labels = raw if spec.task == "classification" else None
        train_idx, val_idx = split_indices(len(rows), spec.val_fraction, seed, spec.uri, labels=labels)
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
    with blaming("dataset.val_uri" if spec.val_uri else "dataset.uri"):
        val_y = _targets(val_raw, spec, classes, spec.val_uri or spec.uri, val_lines)
    if classes:
        first_val_line: dict[str, int] = {}
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
