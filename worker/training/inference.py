"""Use a trained model: rebuild it and its input preprocessing from any trainq checkpoint.

    from worker.training.inference import load_for_inference

    model, preprocess, classes = load_for_inference("final.pt")
    logits = model(preprocess(Image.open("digit.png")).unsqueeze(0))      # image job
    value = model(preprocess({"age": 0.03, "sex": -0.04, ...}).unsqueeze(0))  # CSV job

The preprocessing is the job's own validation path: an image is converted to the job's channels
(:func:`~worker.training.decode.image_to_tensor`: EXIF orientation applied), then ``eval_transforms``, the resize to ``image_size``,
the scaling to [0, 1] and ``normalize``; a CSV row is standardized with the training split's
mean and std that the checkpoint keeps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import nn

from shared.spec import CsvDataset, JobSpec
from worker.training.checkpoint import load_checkpoint
from worker.training.decode import image_to_tensor
from worker.training.transforms import build_transform
from worker.training.models import build_model


class ImagePreprocess:
    """A PIL image (any mode) or an image file → float tensor ``(channels, image_size, image_size)``."""

    def __init__(self, spec: JobSpec) -> None:
        self.dataset = spec.dataset
        self.mode = "L" if self.dataset.channels == 1 else "RGB"
        self.transform = build_transform(self.dataset.eval_transforms, self.dataset)

    def __call__(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                return self.transform(image_to_tensor(opened, self.mode)).as_subclass(torch.Tensor)
        return self.transform(image_to_tensor(image, self.mode)).as_subclass(torch.Tensor)


class RowPreprocess:
    """A CSV row → standardized float tensor ``(num_features,)``.

    A row is a mapping from column name to value (e.g. from ``csv.DictReader``; other columns,
    the target included, are ignored) or a sequence of numbers in ``features`` order.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.features: list[str] = list(data["features"])
        self.mean = torch.tensor(data["feature_mean"], dtype=torch.float32)
        self.std = torch.tensor(data["feature_std"], dtype=torch.float32)

    def __call__(self, row: Mapping[str, Any] | Sequence[float]) -> torch.Tensor:
        if isinstance(row, Mapping):
            missing = [name for name in self.features if name not in row]
            if missing:
                raise ValueError(f"row lacks feature column(s) {missing[:10]}")
            values = [float(row[name]) for name in self.features]
        else:
            values = [float(value) for value in row]
            if len(values) != len(self.features):
                raise ValueError(f"row has {len(values)} values; the model takes {len(self.features)}: {self.features[:10]}")
        return (torch.tensor(values, dtype=torch.float32) - self.mean) / self.std


class Inference(NamedTuple):
    """What :func:`load_for_inference` returns."""

    model: nn.Module  # in eval mode; (batch, *input) → (batch, outputs): logits, or a (batch, 1) prediction
    preprocess: ImagePreprocess | RowPreprocess  # one raw input → one model input (no batch dimension)
    classes: list[str]  # class names in logit order; empty for regression


def load_for_inference(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Inference:
    """The model (weights loaded, eval mode) and the preprocessing of a trainq checkpoint.

    Works for every checkpoint a job writes (``step-*.pt``, ``best.pt``, ``final.pt``), image
    and CSV jobs alike. Loaded with ``torch.load(weights_only=True)``.

    Raises:
        KeyError: the file is not a trainq checkpoint (a bare ``state_dict`` has no spec).
    """
    checkpoint = load_checkpoint(Path(path), map_location=map_location)
    spec = JobSpec.model_validate(checkpoint["spec"])
    classes = list(checkpoint["classes"])
    num_outputs = len(classes) if spec.task == "classification" else 1
    if isinstance(spec.dataset, CsvDataset):
        preprocess: ImagePreprocess | RowPreprocess = RowPreprocess(checkpoint["data"])
        input_shape: tuple[int, ...] = (len(preprocess.features),)
    else:
        preprocess = ImagePreprocess(spec)
        input_shape = (spec.dataset.channels, spec.dataset.image_size, spec.dataset.image_size)
    model = build_model(spec.model, input_shape=input_shape, num_outputs=num_outputs)
    model.load_state_dict(checkpoint["model"])
    return Inference(model.to(map_location).eval(), preprocess, classes)
