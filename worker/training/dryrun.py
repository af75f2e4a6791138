"""A dry run of a spec: list the data, build the model, push one small batch forward and back.

Runs on the CPU in the caller's process (the API's, for ``POST /jobs?dry_run=true``), reads
image folders by listing S3 and downloading only the few images of the batch, and queues
nothing. A spec that would fail at the start of training fails here, with the same message.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from shared.exceptions import DatasetError, JobFailure
from shared.jobs import DryRunReport
from shared.spec import CsvDataset, ImageFolderDataset, JobSpec
from shared.storage import Storage, folder_prefix
from worker.training.data import IMG_EXTENSIONS, LOCAL_SCHEME, build_transform, load_data, to_mode
from worker.training.engine import _check_input_size, seed_everything
from worker.training.models import build_model
from worker.training.recipe import build_loss

#: Images downloaded for the dry run's batch (at most).
DRY_RUN_BATCH = 8


def _listed_images(spec: ImageFolderDataset, storage: Storage) -> tuple[list[str], dict[str, list[str]]]:
    """Classes and image URIs per class, from S3 listings only (hidden files skipped)."""
    per_class: dict[str, list[str]] = {}
    empty: set[str] = set()
    for uri in [spec.uri, *spec.extra_uris]:
        bucket, prefix = folder_prefix(uri)
        objects = storage.list_objects(uri)
        if not objects:
            raise DatasetError(f"dataset prefix {uri} is empty or does not exist")
        for obj in objects:
            parts = obj.key[len(prefix):].split("/")
            if len(parts) < 2 or parts[0].startswith("."):
                continue
            name = parts[0]
            if any(part.startswith(".") for part in parts[1:]) or not parts[-1].lower().endswith(IMG_EXTENSIONS):
                empty.add(name)
                continue
            per_class.setdefault(name, []).append(f"s3://{bucket}/{obj.key}")
    missing = sorted(empty - set(per_class))
    if missing:
        raise DatasetError(f"{spec.uri}: Found no valid file for the classes {', '.join(missing)}.")
    classes = sorted(per_class)
    if len(classes) < 2:
        raise DatasetError(f"{spec.uri} has {len(classes)} class folder(s) {classes}; classification needs at least 2")
    return classes, per_class


def _labels(data) -> list[tuple[int, int]]:
    """(position, label) of every training sample, without decoding images."""
    train = data.train
    if hasattr(train, "tensors"):
        return [(i, int(t)) for i, t in enumerate(train.tensors[1].flatten().tolist())] if data.classes else []
    samples = train.base.samples if hasattr(train.base, "samples") else [s for d in train.base.datasets for s in d.samples]
    return [(i, samples[index][1]) for i, index in enumerate(train.indices)]


def _image_batch(spec: JobSpec, storage: Storage, per_class: dict[str, list[str]], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = spec.dataset
    transform = build_transform(dataset.train_transforms, dataset)
    picks = [(name, uris[i]) for i in range(DRY_RUN_BATCH) for name, uris in sorted(per_class.items()) if i < len(uris)]
    picks = picks[: max(2, min(DRY_RUN_BATCH, spec.batch_size))]
    images, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, uri) in enumerate(picks):
            path = storage.download_file(uri, Path(tmp) / f"{index}")
            try:
                from PIL import Image

                with Image.open(path) as image:
                    images.append(transform(to_mode(image, "L" if dataset.channels == 1 else "RGB")))
            except Exception as exc:
                raise DatasetError(f"cannot read image {uri}: {exc}") from exc
            labels.append(classes.index(name))
    return torch.stack(images), torch.tensor(labels)


def dry_run(spec: JobSpec, storage: Storage, cache_dir: Path, data_root: Path | None = None) -> DryRunReport:
    """Check ``spec`` against its data and model without training; return what was found.

    S3 image folders are only listed (and a batch of images fetched); CSV files and local
    folders (``local://`` under ``data_root``) are read whole.

    Raises:
        JobFailure: (including :class:`shared.exceptions.DatasetError`) what would fail the job.
    """
    started = time.monotonic()
    seed_everything(spec.seed)
    dataset = spec.dataset
    batch = max(2, min(DRY_RUN_BATCH, spec.batch_size))
    uris = [dataset.uri, *getattr(dataset, "extra_uris", [])]
    if isinstance(dataset, CsvDataset) or any(uri.startswith(LOCAL_SCHEME) for uri in uris):
        data = load_data(spec, storage, cache_dir, data_root)
        classes, input_shape, num_outputs = data.classes, data.input_shape, data.num_outputs
        inputs, targets = next(iter(DataLoader(data.train, batch_size=min(batch, len(data.train)))))
        labels = [label for _, label in _labels(data)]
        counts = dict(Counter(classes[i] for i in labels)) if classes else {"rows": len(data.train)}
        num_train = len(data.train)
    else:
        classes, per_class = _listed_images(dataset, storage)
        counts = {name: len(found) for name, found in per_class.items()}
        input_shape = (dataset.channels, dataset.image_size, dataset.image_size)
        num_outputs = len(classes)
        inputs, targets = _image_batch(spec, storage, per_class, classes)
        total = sum(counts.values())
        num_train = total if dataset.val_uri is not None else total - max(1, round(total * dataset.val_fraction))
    if spec.batch_size > num_train:
        raise JobFailure(f"batch_size {spec.batch_size} is larger than the {num_train} training samples of {dataset.uri}")
    if spec.model.num_classes is not None and classes and spec.model.num_classes != len(classes):
        raise JobFailure(f"model.num_classes is {spec.model.num_classes} but {spec.dataset.uri} has {len(classes)} classes: {classes}")
    model = build_model(spec.model, input_shape=input_shape, num_outputs=num_outputs)
    _check_input_size(model, spec, torch.device("cpu"))
    try:
        loss_fn = build_loss(spec, num_outputs)
    except ValueError as exc:
        raise JobFailure(str(exc)) from exc
    model.train()
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    return DryRunReport(
        task=spec.task,
        classes=classes,
        counts=counts,
        input_shape=list(input_shape),
        num_outputs=num_outputs,
        parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        batch_shape=list(inputs.shape),
        loss=float(loss.detach()),
        seconds=time.monotonic() - started,
    )
