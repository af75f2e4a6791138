"""Networks a spec can name: ``small_cnn``, ``mlp`` and torchvision classification architectures,
and loading initial weights (``model.weights_uri``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from botocore.exceptions import ClientError
from torch import nn

from shared.exceptions import JobFailure
from shared.spec import JobSpec, ModelSpec
from shared.storage import Storage
from worker.faults import Fault, classify, in_stage
from worker.training.weights import check_weights_size

#: Key prefixes that wrappers add to a state_dict: ``nn.DataParallel`` and DDP (``module.``),
#: ``torch.compile`` (``_orig_mod.``). Stripped from initial weights when every key has one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class SmallCNN(nn.Module):
    """Four 3×3 conv layers (BatchNorm, ReLU), two 2×2 max-pools, global average pool, linear head.

    For small images (8–64 px). Input ``(batch, in_channels, H, W)``, output logits
    ``(batch, num_classes)``; H and W must be at least 4.

    Args:
        in_channels: 1 (grayscale) or 3 (RGB).
        num_classes: size of the output.
        width: channels of the first two conv layers; the last two have ``2 * width``.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in_channels, H, W)`` float → ``(batch, num_classes)`` logits."""
        return self.head(self.features(x))


class MLP(nn.Module):
    """Linear → ReLU (→ Dropout) per hidden layer, then a linear output layer.

    Input ``(batch, in_features)``, output ``(batch, out_features)``: logits for
    classification, predictions for regression.
    """

    def __init__(self, in_features: int, out_features: int, hidden_sizes: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in_features)`` → ``(batch, out_features)``."""
        return self.layers(x)


@in_stage("build model")
def build_model(spec: ModelSpec, *, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Build the network named by ``spec.arch`` with random weights.

    Args:
        input_shape: one input's shape: ``(channels, H, W)`` for images, ``(features,)`` for mlp.
        num_outputs: classes, or 1 for regression.

    torchvision architectures come from ``torchvision.models.get_model(arch, weights=None,
    num_classes=num_outputs)`` and take ``(batch, 3, H, W)`` (the spec enforces 3 channels).
    """
    if spec.arch == "mlp":
        return MLP(input_shape[0], num_outputs, list(spec.hidden_sizes), spec.dropout)
    if spec.arch == "small_cnn":
        return SmallCNN(input_shape[0], num_outputs)
    model = torchvision.models.get_model(spec.arch, weights=None, num_classes=num_outputs)
    if input_shape[0] != 3:
        _set_input_channels(model, input_shape[0])
    return model


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Replace the first ``Conv2d`` (the stem of every torchvision classifier, ViT's patch
    projection included) by one with ``channels`` inputs and otherwise the same settings."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups if child.groups == 1 else channels, child.bias is not None,
                    child.padding_mode,
                ))
                return
    raise ValueError(f"{type(model).__name__} has no Conv2d to take {channels}-channel input")


@in_stage("initial weights")
def download_weights(storage: Storage, uri: str, path: Path) -> Path:
    """Download ``model.weights_uri`` to ``path``.

    Raises:
        JobFailure: the object does not exist or may not be read (naming ``uri``); a transient
            S3 error propagates (the job is retried).
    """
    try:
        return storage.download_file(uri, path)
    except ClientError as exc:
        if classify(exc) is not Fault.JOB:
            raise
        code = exc.response.get("Error", {}).get("Code", "?")
        what = "does not exist" if code in {"404", "NoSuchKey", "NoSuchBucket"} else "cannot be read"
        raise JobFailure(f"model.weights_uri {uri} {what} ({code})") from exc


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the key prefixes of :data:`WRAPPER_PREFIXES` (repeatedly, in any order)
    when every key carries the same one: weights saved from ``DataParallel``/DDP or ``torch.compile``."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            return state
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor], shown: int = 3) -> str:
    """What keeps ``state`` from loading into ``model``: missing and unexpected keys, other shapes."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]

    def some(keys: list[str]) -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(repr(key) for key in keys[:shown]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({some(unexpected)})")
    if shapes:
        parts.append(
            f"{len(shapes)} tensor(s) of another shape ("
            + ", ".join(f"{key!r}: {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model" for key in shapes[:shown])
            + (f" and {len(shapes) - shown} more" if len(shapes) > shown else "")
            + ")"
        )
    return "; ".join(parts)


@in_stage("initial weights")
def load_initial_weights(model: nn.Module, path: Path, uri: str) -> None:
    """Load ``path`` (a trainq checkpoint, or a bare ``state_dict``) into ``model``, strictly.

    Loaded with ``torch.load(weights_only=True)``: a file that needs arbitrary pickle is refused.
    Keys saved from ``nn.DataParallel``/DDP (``module.``) or ``torch.compile`` (``_orig_mod.``)
    are accepted: the prefix is stripped.

    Raises:
        JobFailure: the file is empty, would load more than such weights can need
            (:func:`~worker.training.weights.check_weights_size`), is not a ``torch.save`` file, not a state dict, or its tensors
            do not fit the model (naming ``uri``, a few missing and unexpected keys, their counts and
            the shapes that differ).
    """
    if path.stat().st_size == 0:
        raise JobFailure(f"model.weights_uri {uri} is an empty file (0 bytes)")
    check_weights_size(path, uri, model)  # before torch.load allocates what the file declares
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise JobFailure(
            f"model.weights_uri {uri} is not a weights-only file saved with torch.save ({type(exc).__name__}: {detail})"
        ) from exc
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise JobFailure(f"model.weights_uri {uri}: expected a state_dict or a trainq checkpoint")
    state = strip_wrapper_prefixes(state)
    problem = _mismatch(model, state)
    if problem:
        raise JobFailure(f"model.weights_uri {uri} does not fit model.arch: {problem}")
    model.load_state_dict(state, strict=True)


def check_input_size(model: nn.Module, spec: JobSpec, device: torch.device) -> None:
    """Run one tiny batch through ``model`` so a size it cannot take fails now, naming the field.

    Some architectures need a minimum or fixed input (``vit_b_16``: 224 px; ``alexnet``: 63 px).
    The probe runs in eval mode under ``fork_rng``, so it changes neither BatchNorm statistics nor
    any random state.

    Raises:
        JobFailure: the forward pass failed for ``(2, channels, image_size, image_size)`` input.
    """
    if spec.dataset.type != "image_folder":
        return
    size, channels = spec.dataset.image_size, spec.dataset.channels
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            model(torch.zeros(2, channels, size, size, device=device))
        except Exception as exc:
            smallest = _smallest_input_size(model, channels, size, device)
            hint = f"; the smallest dataset.image_size it takes is {smallest}" if smallest else ""
            raise JobFailure(
                f"model.arch {spec.model.arch!r} cannot take {channels}x{size}x{size} images "
                f"(dataset.image_size={size}){hint}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                field="dataset.image_size",
            ) from exc
        finally:
            model.train()


def _smallest_input_size(model: nn.Module, channels: int, failed: int, device: torch.device, largest: int = 512) -> int | None:
    """The smallest square side above ``failed`` (up to ``largest`` px) that ``model`` takes.

    Only for the error message: doubles the side until a forward pass of one image works, then
    bisects (assumes that a model taking a size takes every larger one, true of strided CNNs).
    Call in eval mode under ``no_grad``. None when even ``largest`` fails.
    """

    def takes(side: int) -> bool:
        try:
            model(torch.zeros(1, channels, side, side, device=device))
        except Exception:
            return False
        return True

    low, high = failed, None  # low never works; high works
    side = failed
    while side < largest:
        side = min(2 * side, largest)
        if takes(side):
            high = side
            break
        low = side
    if high is None:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if takes(middle) else (middle, high)
    return high
