"""How much memory a job will need while it trains, estimated before it starts, and its budget.

The estimate is the usual accounting of training memory (e.g. the PyTorch "Understanding GPU
memory" notes; Rajbhandari et al., 2020, ZeRO, §3 for the optimizer-state terms):

    parameters and buffers + gradients (one per trainable parameter)
    + optimizer state (Adam/AdamW: 2 per trainable parameter; SGD: 1 with momentum, else 0)
    + activations (what autograd saves for backward in one forward pass of ``batch_size`` samples)

Activations are *measured*, not guessed: the model's forward runs once on PyTorch's ``meta``
device (shapes only, no memory, no arithmetic) with ``batch_size`` inputs, and every tensor
autograd saves for backward is counted once (``torch.autograd.graph.saved_tensors_hooks``). Not
counted: the CUDA context and cuDNN workspaces, allocator fragmentation, DataLoader workers, the
transient gradients of activations during backward; hence the budget's margin.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from shared.exceptions import JobFailure
from shared.schemas import MemoryEstimate
from shared.settings import Settings
from shared.spec import JobSpec

logger = logging.getLogger(__name__)

#: Share of a GPU's memory a job may plan to use by default (the rest: CUDA context, allocator).
GPU_BUDGET_FRACTION = 0.9
#: Share of the worker's RAM a CPU job may plan to use by default (the rest: the worker, DataLoader workers).
CPU_BUDGET_FRACTION = 0.75


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_per_parameter(spec: JobSpec) -> int:
    """Optimizer state tensors kept per trainable parameter tensor: Adam/AdamW 2, SGD 1 with momentum else 0."""
    if spec.optimizer.name in {"adam", "adamw"}:
        return 2
    return 1 if getattr(spec.optimizer, "momentum", 0.0) else 0


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """Bytes autograd saves for backward in one training-mode forward of ``(batch_size, *input_shape)``.

    Runs ``model`` with its parameters and buffers swapped for ``meta`` tensors
    (``torch.func.functional_call``), so it allocates nothing and leaves ``model`` unchanged
    (BatchNorm statistics included). Saved tensors sharing storage are counted once; saved
    parameters (and views of them) are not activations and are skipped.
    """
    state = {name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for name, p in model.named_parameters()}
    state |= {name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()}
    own = {t.untyped_storage()._cdata for t in state.values()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return tensor

    inputs = torch.empty(batch_size, *input_shape, device="meta")
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = functional_call(model, state, (inputs,))
    finally:
        model.train(was_training)
    return sum(saved.values()) + _bytes([inputs, outputs])


def estimate_memory(
    model: nn.Module, spec: JobSpec, input_shape: tuple[int, ...], budget_bytes: int | None, *, batch_size: int | None = None
) -> MemoryEstimate:
    """The training memory of ``model`` for ``spec`` (its optimizer) and a batch; see the module doc.

    ``batch_size``: samples one training process takes at a time (default ``spec.batch_size``;
    a job on ``resources.gpus`` processes passes ``batch_size / gpus``). ``budget_bytes`` is only
    recorded (None: no budget applies); :func:`check_memory` compares.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameters = _bytes(model.parameters()) + _bytes(model.buffers())
    gradients = _bytes(trainable)
    optimizer = optimizer_state_per_parameter(spec) * gradients
    try:
        activations = activation_bytes(model, input_shape, batch_size or spec.batch_size)
    except Exception:  # an op without a meta kernel (none among the spec's architectures): estimate without it
        logger.warning("activations of model.arch %r could not be measured on the meta device", spec.model.arch, exc_info=True)
        activations = 0
    return MemoryEstimate(
        parameters_bytes=parameters,
        gradients_bytes=gradients,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        total_bytes=parameters + gradients + optimizer + activations,
        budget_bytes=budget_bytes,
    )


def host_memory_bytes() -> int:
    """Physical RAM, or this process's cgroup (v2 or v1) memory limit if that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def memory_budget(settings: Settings, device: torch.device) -> int:
    """``MAX_JOB_MEMORY_BYTES`` if set; else 90% of the CUDA device's memory, or 75% of the RAM on a CPU."""
    if settings.max_job_memory_bytes is not None:
        return settings.max_job_memory_bytes
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_BUDGET_FRACTION)
    return int(host_memory_bytes() * CPU_BUDGET_FRACTION)


def format_bytes(count: int) -> str:
    """``count`` bytes for people: ``1.50 GiB`` or ``12.3 MiB``."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_memory(estimate: MemoryEstimate, spec: JobSpec, input_shape: tuple[int, ...], *, batch_size: int | None = None) -> None:
    """Refuse a job whose estimate exceeds its budget, with the numbers; ``batch_size`` as in
    :func:`estimate_memory`.

    Raises:
        JobFailure: field ``batch_size``, type ``memory_budget_exceeded``.
    """
    if estimate.budget_bytes is None or estimate.total_bytes <= estimate.budget_bytes:
        return
    shape = "x".join(str(n) for n in input_shape)
    per_process = batch_size or spec.batch_size
    batch = f"batch_size {spec.batch_size}" + (f" ({per_process} per GPU)" if per_process != spec.batch_size else "")
    raise JobFailure(
        f"the job needs about {format_bytes(estimate.total_bytes)} to train, more than this worker's budget of "
        f"{format_bytes(estimate.budget_bytes)} (MAX_JOB_MEMORY_BYTES): parameters {format_bytes(estimate.parameters_bytes)}, "
        f"gradients {format_bytes(estimate.gradients_bytes)}, optimizer state {format_bytes(estimate.optimizer_bytes)}, "
        f"activations {format_bytes(estimate.activations_bytes)} for {batch} of {shape} inputs. "
        "Lower batch_size (use grad_accumulation_steps for the same effective batch), the image size or the model.",
        field="batch_size",
        error_type="memory_budget_exceeded",
    )
