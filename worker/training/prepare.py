"""Everything a job needs before its first step: the one preparation path of a job and of its dry run."""

from __future__ import annotations

import math
import random
from typing import Any
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from shared.access import check_spec_access
from shared.exceptions import DatasetError, Interrupted, JobFailure
from shared.records import JobPhase
from shared.schemas import MemoryEstimate
from shared.settings import Settings
from shared.spec import ImageFolderDataset, JobSpec
from shared.storage import ShouldStop, Storage
from worker.training.data import load_data
from worker.training.device_data import on_device
from worker.training.distributed import SINGLE_PROCESS, ProcessGroup
from worker.training.fastpath import FastPath, build_fast_path, prepare_model
from worker.training.loaders import build_loaders
from worker.training.memory import check_memory, estimate_memory
from worker.training.models import build_model, check_input_size, load_initial_weights
from worker.training.prefetch import DevicePrefetcher
from worker.training.recipe import build_loss, build_optimizer, build_scheduler
from worker.training.sources import LoadOptions, TrainingData


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``.

    Raises:
        JobFailure: ``cuda`` was asked for on a worker without CUDA.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise JobFailure("spec.device is 'cuda' but this worker has no CUDA device")
    return torch.device(requested)


def describe_device(device: torch.device) -> str:
    """Human name of ``device``: the CUDA device name (e.g. ``NVIDIA H200``) or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass
class Prepared:
    """Everything a job needs before its first step, from :func:`prepare`.

    ``loader`` yields this process's training batches ``(inputs, targets)`` of
    ``spec.batch_size / world_size`` (the last one may be smaller), shuffled by ``sampler`` per
    epoch, already on the device (:class:`~worker.training.prefetch.DevicePrefetcher`);
    ``val_loader`` the validation set in order. ``model`` is on the device (NHWC weights
    with ``channels_last``), not yet wrapped for DDP or compiled (:func:`training_module`);
    ``fast`` is how the loop moves batches and runs forward, backward and the optimizer step.
    ``memory`` is the estimate the job was checked against.
    """

    data: TrainingData
    model: nn.Module
    fast: FastPath
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DevicePrefetcher
    sampler: DistributedSampler
    val_loader: DataLoader
    steps_per_epoch: int
    memory: MemoryEstimate


#: ``(phase, files_done, files_total, bytes_done, bytes_total)``: what preparation is doing.
PhaseCallback = Callable[[JobPhase, int | None, int | None, int | None, int | None], None]


def prepare(
    spec: JobSpec,
    storage: Storage,
    settings: Settings,
    device: torch.device,
    *,
    budget_bytes: int | None,
    should_stop: ShouldStop | None = None,
    on_phase: PhaseCallback | None = None,
    group: ProcessGroup = SINGLE_PROCESS,
) -> Prepared:
    """Data, model (with initial weights), fast path, loss, optimizer, schedule and loaders of a job.

    The one preparation path of a job, and of its dry run: check the spec's queue and URIs
    against the settings (:func:`shared.access.check_spec_access`), list and download the data
    into ``DATA_CACHE_DIR/datasets`` (cached by content), decode every image once, check the spec
    against the data, build the model and load ``model.weights_uri`` (cached in
    ``DATA_CACHE_DIR/weights``), set up the fast path (precision, ``channels_last``), probe the
    input size, estimate the training memory of one process (``batch_size / resources.gpus``
    samples) against the budget (:mod:`worker.training.memory`), build loss, optimizer,
    schedule and loaders.

    Args:
        budget_bytes: memory the job may need by the estimate (a job passes
            :func:`worker.training.memory.memory_budget`); None: estimate only, do not refuse.
        should_stop: asked between files, pages and phases; a truthy answer (the reason) stops
            preparation within seconds. Never a collective: with several processes only rank 0
            loads while the others wait.
        on_phase: told each phase (``downloading`` with file and byte counts, ``verifying``
            with file counts, ``building_model``) as it goes.
        group: this process's rank of the job's processes: rank 0 downloads and verifies the
            data first, the others then find it in the cache.

    Raises:
        JobFailure: the job cannot run; ``field`` names the spec field at fault.
        Interrupted: ``should_stop`` said so.
    """
    report = on_phase or (lambda *_: None)

    def stop_if_asked() -> None:
        if should_stop is not None and (reason := should_stop()):
            raise Interrupted(reason)

    check_spec_access(spec, settings)  # the queue and every URI, again: settings may have changed since submit
    report(JobPhase.DOWNLOADING, None, None, None, None)
    if not group.is_main:
        group.barrier()  # rank 0 downloads and verifies the data first; the others find it cached
    options = LoadOptions(max_image_pixels=settings.max_image_pixels, should_stop=should_stop, on_progress=report)
    data = load_data(spec, storage, settings.data_cache_dir / "datasets", settings.data_root, options)
    if isinstance(spec.dataset, ImageFolderDataset):
        data = on_device(data, spec.dataset, device)  # dataset.decode: JPEGs decoded on the device
    if group.is_main:
        group.barrier()
    if spec.model.num_classes is not None and data.task == "classification" and spec.model.num_classes != data.num_outputs:
        raise JobFailure(
            f"model.num_classes is {spec.model.num_classes} but {spec.dataset.uri} has {data.num_outputs} classes: {data.classes}",
            field="model.num_classes",
        )
    if spec.batch_size > len(data.train):
        raise JobFailure(
            f"batch_size {spec.batch_size} is larger than the {len(data.train)} training samples of {spec.dataset.uri}",
            field="batch_size",
        )
    stop_if_asked()
    report(JobPhase.BUILDING_MODEL, None, None, None, None)
    model = build_model(spec.model, input_shape=data.input_shape, num_outputs=data.num_outputs)
    if spec.model.weights_uri is not None:
        try:
            path = storage.download_cached(spec.model.weights_uri, settings.data_cache_dir / "weights")
        except DatasetError as exc:  # missing or unreadable: name the field, fail once
            raise JobFailure(f"model.weights_uri {exc}", field="model.weights_uri") from exc
        try:
            load_initial_weights(model, path, spec.model.weights_uri)
        except JobFailure as exc:
            raise JobFailure(str(exc), field="model.weights_uri") from exc
    stop_if_asked()
    try:
        fast = build_fast_path(spec.performance, device, image_inputs=len(data.input_shape) == 3, finish=data.finish)
    except JobFailure as exc:
        raise JobFailure(str(exc), field="performance.precision") from exc
    model = prepare_model(model.to(device), fast)
    check_input_size(model, spec, device)
    per_process = spec.batch_size // spec.resources.gpus  # batch_size is the global batch
    memory = estimate_memory(model, spec, data.input_shape, budget_bytes, batch_size=per_process)
    check_memory(memory, spec, data.input_shape, batch_size=per_process)
    try:
        loss_fn = build_loss(spec, data.num_outputs).to(device)
    except ValueError as exc:  # a spec that does not fit the data (class_weights length…)
        raise JobFailure(str(exc), field="loss") from exc
    try:
        optimizer = build_optimizer(spec, model.parameters())
        loader, sampler, val_loader = build_loaders(data, spec, device, group, model=model)
        loader = DevicePrefetcher(loader, fast)  # yields batches on the device, the next one staged on CUDA
        steps_per_epoch = math.ceil(len(loader) / spec.grad_accumulation_steps)
        scheduler = build_scheduler(spec, optimizer, total_steps=spec.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    except ValueError as exc:
        raise JobFailure(str(exc)) from exc
    return Prepared(data, model, fast, loss_fn, optimizer, scheduler, loader, sampler, val_loader, steps_per_epoch, memory)
