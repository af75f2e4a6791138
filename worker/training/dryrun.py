"""A dry run of a spec: the job's own preparation, then one training step, on the CPU.

Runs on a worker (the Celery task ``trainq.dry_run`` on the ``DRY_RUN_QUEUE``), never in the
API. It calls :func:`worker.training.prepare.prepare`, the code every job starts with — listing
and downloading the data into the worker's cache (which is then warm for the job), decoding
every image, the spec's checks against the data, the model with its ``model.weights_uri``, the
input-size probe, the memory estimate, loss, optimizer and loaders — so whatever would fail the
job's preparation fails the dry run with the same message and the spec field at fault. Then the
epoch's real first batch takes one training step (forward, backward, optimizer step) and its
real last batch (e.g. a final batch of 1) goes forward and backward. Nothing is uploaded or queued.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset

from shared.exceptions import JobFailure
from shared.schemas import DryRunReport
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import ShouldStop, Storage
from worker.training.cpu import training_threads
from worker.training.memory import CPU_BUDGET_FRACTION, format_bytes, host_memory_bytes, memory_budget
from worker.training.prepare import Prepared, prepare, seed_everything
from worker.training.sources import TrainingData, dataset_labels
from worker.training.split import class_counts


def dry_run(spec: JobSpec, storage: Storage, settings: Settings, *, should_stop: ShouldStop | None = None) -> DryRunReport:
    """Prepare ``spec`` exactly as its job would, on the CPU, and take one training step.

    The memory estimate is checked against ``MAX_JOB_MEMORY_BYTES``; when that is unset, against
    the budget the job would have on a worker like this one (its GPU, or its RAM), except for a
    ``"device": "cuda"`` job on a worker without CUDA (the report then carries the estimate and a
    warning). A batch too large for this worker's RAM is cut for the step, with a warning, so a
    dry run never takes its worker down.

    Raises:
        JobFailure: (``field`` set where one is at fault) what would fail the job.
        Interrupted: ``should_stop`` said so.
    """
    started = time.monotonic()
    torch.set_num_threads(training_threads(0, settings.torch_threads))  # the batch is collated here, without workers
    seed_everything(spec.seed)
    cpu = torch.device("cpu")
    host_budget = int(host_memory_bytes() * CPU_BUDGET_FRACTION)
    warnings: list[str] = []
    if spec.performance.precision == "fp16" and spec.device != "cpu" and not torch.cuda.is_available():
        # fp16 needs CUDA: checked on the GPU the job gets; the step here runs in fp32.
        spec = spec.model_copy(update={"performance": spec.performance.model_copy(update={"precision": "fp32"})})
        warnings.append("performance.precision 'fp16' needs a GPU: the dry run's step ran in fp32 on this worker's CPU")
    budget = _job_budget(spec, settings)
    prepared = prepare(spec, storage, settings, cpu, should_stop=should_stop, budget_bytes=budget)
    if budget is None:
        warnings.append(
            "memory not checked: MAX_JOB_MEMORY_BYTES is unset and this dry-run worker has no GPU to measure; "
            f"the job needs about {format_bytes(prepared.memory.total_bytes)}"
        )
    batches = list(prepared.loader.batch_sampler)  # the first epoch's batches, as sample indices
    first, last = batches[0], batches[-1]
    fits = _samples_that_fit(prepared, spec, host_budget)
    if fits < len(first):
        warnings.append(
            f"the step ran on {fits} of the first batch's {len(first)} samples: the whole batch needs more than this "
            f"dry-run worker's {format_bytes(host_budget)}"
        )
    prepared.data.set_epoch(0)
    prepared.model.train()
    inputs, targets = _batch(prepared, first[: max(fits, 1)])
    loss = _train_step(prepared, spec, inputs, targets, "first", len(first))
    if len(batches) > 1 and len(last) <= fits:
        last_inputs, last_targets = _batch(prepared, last)
        _forward_backward(prepared, last_inputs, last_targets, "last", len(last))
    data = prepared.data
    return DryRunReport(
        task=data.task,
        classes=data.classes,
        counts=_counts(data, data.train),
        val_counts=_counts(data, data.val),
        input_shape=list(data.input_shape),
        num_outputs=data.num_outputs,
        num_val=len(data.val),
        steps_per_epoch=prepared.steps_per_epoch,
        parameters=sum(p.numel() for p in prepared.model.parameters() if p.requires_grad),
        batch_shape=[len(first), *inputs.shape[1:]],
        last_batch_size=len(last),
        loss=loss,
        memory=prepared.memory,
        warnings=warnings,
        seconds=time.monotonic() - started,
    )


def _job_budget(spec: JobSpec, settings: Settings) -> int | None:
    """The memory budget the job would have on a worker like this one; None when that is unknown here."""
    if settings.max_job_memory_bytes is not None:
        return settings.max_job_memory_bytes
    if spec.device != "cpu" and torch.cuda.is_available():
        return memory_budget(settings, torch.device("cuda"))
    if spec.device == "cuda":
        return None
    return memory_budget(settings, torch.device("cpu"))


def _samples_that_fit(prepared: Prepared, spec: JobSpec, budget_bytes: int) -> int:
    """How many samples of a batch a CPU step can take within ``budget_bytes`` (by the estimate)."""
    memory = prepared.memory
    fixed = memory.parameters_bytes + memory.gradients_bytes + memory.optimizer_bytes
    # The estimate is one training process's: batch_size / resources.gpus samples.
    per_sample = max(1, memory.activations_bytes // (spec.batch_size // spec.resources.gpus))
    batch_size = prepared.loader.batch_size or 1
    return max(0, min(batch_size, (budget_bytes - fixed) // per_sample))


def _batch(prepared: Prepared, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training samples ``indices``, decoded, transformed and collated as the DataLoader would,
    on the device as the loop moves them (``channels_last`` where the job uses it)."""
    inputs, targets = prepared.loader.collate_fn([prepared.data.train[i] for i in indices])
    return prepared.fast.to_device(inputs, targets)


def _forward_backward(prepared: Prepared, inputs: torch.Tensor, targets: torch.Tensor, which: str, size: int) -> torch.Tensor:
    try:
        with prepared.fast.autocast():
            loss = prepared.loss_fn(prepared.model(inputs), targets)
        prepared.fast.backward(loss)
    except Exception as exc:  # what torch says about this model and batch, e.g. BatchNorm and a batch of 1
        raise JobFailure(
            f"a training step on the epoch's {which} batch ({size} sample{'s' if size != 1 else ''}) failed: "
            f"{type(exc).__name__}: {exc}",
            field="batch_size" if size == 1 else None,
            error_type="training_step_error",
        ) from exc
    return loss


def _train_step(prepared: Prepared, spec: JobSpec, inputs: torch.Tensor, targets: torch.Tensor, which: str, size: int) -> float:
    """Forward, backward, clip and one optimizer step, as the training loop does (in the job's
    precision, :class:`worker.training.fastpath.FastPath`); return the loss."""
    loss = _forward_backward(prepared, inputs, targets, which, size)
    if spec.grad_clip_norm is not None:
        prepared.fast.unscale(prepared.optimizer)
        nn.utils.clip_grad_norm_(prepared.model.parameters(), spec.grad_clip_norm)
    prepared.fast.step(prepared.optimizer)
    prepared.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _counts(data: TrainingData, dataset: Dataset) -> dict[str, int]:
    """Samples of ``dataset`` (``data.train`` or ``data.val``) per class, zeros included
    (classification), or ``{"rows": n}`` (regression); without decoding."""
    if not data.classes:
        return {"rows": len(dataset)}
    return class_counts(data.classes, dataset_labels(dataset))
