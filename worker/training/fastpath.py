"""The GPU fast path of a job: mixed precision, memory format, cuDNN, determinism and compile.

One :class:`FastPath` per run, built from the spec's ``performance`` section and the device. The
loop calls it at four places only: moving a batch to the device (``non_blocking`` copies from
pinned memory, NHWC for image models, then the data's ``finish``), the forward pass and loss (``torch.autocast``), the
backward pass (loss scaling for fp16) and the optimizer step (skipped by the scaler on inf/NaN
gradients). With ``fp32`` and no ``channels_last`` every call is the plain PyTorch one, so a CPU
job trains exactly as before.

Sources: PyTorch's "Automatic Mixed Precision" recipe (autocast + ``GradScaler``, unscale before
clipping), the "(beta) Channels Last Memory Format" tutorial, and "Reproducibility" notes
(``use_deterministic_algorithms``, ``CUBLAS_WORKSPACE_CONFIG``, ``cudnn.benchmark``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.exceptions import JobFailure
from shared.spec import PerformanceSpec
from worker.training.device_data import EncodedBatch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Compute capability from which CUDA GPUs have bf16 tensor cores (Ampere, sm_80).
BF16_MIN_CAPABILITY = (8, 0)


def cuda_supports_bf16(device: torch.device) -> bool:
    """True when ``device`` is a CUDA GPU with native bf16 (compute capability 8.0 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a job trains in on ``device``: ``bf16``, ``fp16`` or ``fp32``.

    ``auto`` is ``bf16`` on a CUDA GPU with bf16, ``fp16`` on an older one, ``fp32`` on a CPU.

    Raises:
        JobFailure: ``fp16`` on a CPU, or ``bf16`` on a GPU without bf16 (naming the field).
    """
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if cuda_supports_bf16(device) else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise JobFailure("performance.precision 'fp16' needs a CUDA device; on a CPU use 'bf16' or 'fp32'")
    if requested == "bf16" and device.type == "cuda" and not cuda_supports_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise JobFailure(f"performance.precision 'bf16' needs a GPU with bf16 (compute capability 8.0+); {name} has none: use 'fp16'")
    return requested


@dataclass
class FastPath:
    """How one run moves batches, runs forward/backward and steps the optimizer.

    Attributes:
        device: where the model trains.
        precision: ``bf16`` or ``fp16`` (autocast) or ``fp32`` (none).
        channels_last: 4-D batches ``(batch, channels, H, W)`` are stored NHWC on the device.
        scaler: the fp16 loss scaler (``torch.amp.GradScaler``), else None.
        finish: the data's last step (uint8 → float, normalize), run on each batch's inputs
            after the copy, so only a quarter of the bytes cross to the device.
    """

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None

    def autocast(self) -> AbstractContextManager:
        """Context for the forward pass and loss: ``torch.autocast`` in bf16/fp16, else nothing."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def to_device(self, inputs: torch.Tensor | EncodedBatch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy a batch to the device (asynchronously from pinned memory); NHWC for 4-D inputs if set.

        An :class:`~worker.training.device_data.EncodedBatch` (``dataset.decode: device``) is
        decoded and augmented on the device by the data's ``finish``.
        """
        if isinstance(inputs, EncodedBatch):
            inputs = self.finish(inputs.to(self.device))
            if self.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            return inputs, targets.to(self.device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        else:
            inputs = inputs.to(self.device, non_blocking=True)
        if self.finish is not None:
            inputs = self.finish(inputs)
        return inputs, targets.to(self.device, non_blocking=True)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the scaler in fp16 (small gradients would underflow)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place; call before clipping them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; in fp16 the scaler skips a step with inf/NaN gradients and adapts its scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (floats and ints), for checkpoints; None without a scaler."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` returned (ignored without a scaler or without state)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def build_fast_path(
    performance: PerformanceSpec,
    device: torch.device,
    image_inputs: bool,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FastPath:
    """The :class:`FastPath` of a job on ``device``; ``image_inputs``: the model takes 4-D images;
    ``finish``: the data's last step, run on each batch once on the device (``TrainingData.finish``).

    Raises:
        JobFailure: as :func:`resolve_precision`.
    """
    precision = resolve_precision(performance.precision, device)
    wants_nhwc = performance.channels_last is True or (performance.channels_last == "auto" and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return FastPath(device=device, precision=precision, channels_last=wants_nhwc and image_inputs, scaler=scaler, finish=finish)


def configure_backends(performance: PerformanceSpec, device: torch.device) -> None:
    """Set the process-wide cuDNN and determinism flags for this job (every job sets all of them,
    so one job's choice never leaks into the next on a long-lived worker).

    ``deterministic`` applies on CUDA only. cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when the
    process first uses it: it is set here if unset, but a worker that already ran a GPU job
    without it should be started with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for a guarantee.
    """
    deterministic = performance.deterministic and device.type == "cuda"
    torch.backends.cudnn.benchmark = performance.cudnn_benchmark
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel warns instead of failing the job.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def prepare_model(model: nn.Module, fast: FastPath) -> nn.Module:
    """Convert ``model``'s 4-D weights to NHWC when the run uses ``channels_last`` (in place)."""
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def training_module(model: nn.Module, performance: PerformanceSpec, device: torch.device, distributed: bool) -> nn.Module:
    """The module the loop calls: ``model`` itself, wrapped in ``DistributedDataParallel`` when
    ``distributed``, then ``torch.compile``-d when asked.

    ``model`` stays the one whose ``state_dict`` goes into checkpoints and that validation runs,
    so no ``module.`` or ``_orig_mod.`` prefix ever reaches a checkpoint.
    """
    wrapped: nn.Module = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if performance.compile:
        wrapped = torch.compile(wrapped)
    return wrapped
