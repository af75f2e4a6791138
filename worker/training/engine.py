"""The training loop: spec in; checkpoints and TensorBoard events out to S3; resumable.

The standard PyTorch flow, in nanoGPT's order: Dataset/DataLoader → model → loss → Adam
``zero_grad``/``backward``/``step``, validation and checkpoint after each epoch. This module
knows nothing of Celery, FastAPI or Redis: it reports and asks whether to stop through
:class:`TrainingCallbacks`.

Resume: a run first looks for the job's newest checkpoint in S3 and, if there is one, restores
model, optimizer, epoch/step, RNG states and the DataLoader's position in the epoch
(torchdata's ``StatefulDataLoader``), so that on the same hardware a killed and resumed job ends
with weights bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from botocore.exceptions import ClientError
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.utils import make_grid

from shared.access import check_spec_access
from shared.exceptions import DatasetError, Interrupted, JobFailure
from shared.jobs import DatasetInfo, JobPhase, MemoryEstimate, Progress
from shared.sanitize import public_message
from shared.settings import Settings
from shared.spec import CsvDataset, JobSpec
from shared.storage import ShouldStop, Storage
from worker.faults import Fault, classify, in_stage, mark_stage
from worker.training.checkpoint import (
    Snapshot,
    capture_rng_state,
    checkpoint_payload,
    load_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from worker.training.cpu import probe_threads, training_threads, usable_cpus
from worker.training.data import LoadOptions, TrainingData, load_data
from worker.training.distributed import SINGLE_PROCESS, ProcessGroup, launch
from worker.training.fastpath import FastPath, build_fast_path, configure_backends, prepare_model, training_module
from worker.training.memory import check_memory, estimate_memory, memory_budget
from worker.training.models import build_model, load_initial_weights
from worker.training.recipe import MetricTracker, build_loss, build_optimizer, build_scheduler
from worker.training.retention import delete_checkpoint, stale_checkpoints
from worker.training.uploads import BackgroundUploader

logger = logging.getLogger(__name__)
# torchdata 0.11's StatefulDataLoader calls a torch API deprecated in newer torch; harmless noise.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

FINAL_CHECKPOINT = "final.pt"
BEST_CHECKPOINT = "best.pt"
#: Seconds a stopping run (cancel, time limit, shutdown) waits for its last checkpoint's upload.
STOP_UPLOAD_WAIT_S = 60.0
_STEP_CHECKPOINT = re.compile(r"step-(\d+)\.pt$")


class StopReason(str, Enum):
    """Why a run stopped before the end of its last epoch."""

    CANCELLED = "cancelled"
    TIME_LIMIT = "time limit"
    SHUTDOWN = "worker shutdown"
    PREEMPTED = "preempted"  # a job of higher priority needs the worker; resumed later from this checkpoint
    LEASE_LOST = "lease lost"

    @property
    def saves_checkpoint(self) -> bool:
        """A run that lost its lease must not write: another worker may own the job now."""
        return self is not StopReason.LEASE_LOST


class TrainingStopped(Exception):
    """Raised by :func:`run_training` when it stops early; ``checkpoint`` is in S3 (or None)."""

    def __init__(self, reason: StopReason, step: int, runtime_s: float, checkpoint: str | None) -> None:
        super().__init__(f"stopped at step {step} after {runtime_s:.1f} s: {reason.value}")
        self.reason, self.step, self.runtime_s, self.checkpoint = reason, step, runtime_s, checkpoint


class TrainingCallbacks:
    """Hooks the engine calls while a job runs; the default does nothing and never stops.

    The Celery task subclasses this to write the job record and to relay cancel requests;
    tests and a CLI can use their own. ``on_checkpoint`` is called from the upload thread.
    """

    def on_start(self, *, device: str, dataset: DatasetInfo, tensorboard_uri: str, resumed_from: str | None) -> None:
        """Data loaded, model built (and restored); training is about to begin on ``device``."""

    def on_progress(self, progress: Progress) -> None:
        """Called every ``progress_interval_s`` seconds, after every epoch and when ``progress.phase`` changes."""

    def on_checkpoint(self, uri: str) -> None:
        """A checkpoint is complete in S3 at ``uri``."""

    def on_checkpoint_deleted(self, uri: str) -> None:
        """An older checkpoint was deleted from S3 (``checkpoint.keep_last``); called from the upload thread."""

    def stop_requested(self) -> StopReason | None:
        """Polled after every optimizer step, before every validation batch and between the files
        and phases of preparation; must be cheap (no I/O). None means go on."""
        return None


@dataclass
class TrainResult:
    """Outcome of a finished job: final metrics and where the final checkpoint is."""

    final_checkpoint: str
    epochs: int
    steps: int
    val_loss: float
    val_accuracy: float
    runtime_s: float
    metrics: dict[str, float] = field(default_factory=dict)  # the last epoch's (val_*, train_*)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_dataloader_worker(worker_id: int) -> None:
    # Each DataLoader worker gets a distinct torch seed from the loader's generator; derive
    # numpy's and Python's from it so augmentations using them are reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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


def checkpoint_uris(storage: Storage, job_id: str) -> list[str]:
    """The job's checkpoints in S3, newest first (``final.pt``, then ``step-N.pt`` by N).

    Only complete objects are ever listed: an S3 PUT or multipart upload appears whole or not
    at all, so a worker killed mid-upload leaves nothing behind.
    """
    ranked = []
    for obj in storage.list_objects(storage.job_uri(job_id, "checkpoints")):
        name = obj.key.rsplit("/", 1)[-1]
        match = _STEP_CHECKPOINT.fullmatch(name)
        if name == FINAL_CHECKPOINT:
            ranked.append((float("inf"), obj.key))
        elif match:
            ranked.append((int(match[1]), obj.key))
    return [f"s3://{storage.bucket}/{key}" for _, key in sorted(ranked, reverse=True)]


@in_stage("validation")
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    task: str = "classification",
    fast: FastPath | None = None,
    should_stop: ShouldStop | None = None,
) -> dict[str, float]:
    """Validation metrics of ``model`` over ``loader``, in eval mode.

    Classification: ``val_loss`` (mean per sample), ``val_accuracy`` and, with more than 5
    classes, ``val_top5_accuracy`` (0..1). Regression: ``val_loss``, ``val_mae``, ``val_rmse``
    and ``val_r2`` (coefficient of determination, 1 − SS_res / SS_tot). ``fast``: the run's
    precision, memory format and the data's ``finish`` (default: fp32, as stored, no finish:
    pass ``FastPath(device, finish=data.finish)`` for an image folder's uint8 batches).

    Raises:
        Interrupted: ``should_stop`` (asked before every batch; it must be cheap) answered a reason.
    """
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct, top5, |err|, err²
    targets_all = []
    count = 0
    fast = fast or FastPath(device)
    for inputs, targets in loader:
        if should_stop is not None and (reason := should_stop()):
            raise Interrupted(reason)
        inputs, targets = fast.to_device(inputs, targets)
        with fast.autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        total_loss += loss.double() * targets.shape[0]
        if task == "classification":
            sums[0] += (outputs.argmax(dim=1) == targets).sum()
            if outputs.shape[1] > 5:
                sums[1] += (outputs.topk(5, dim=1).indices == targets[:, None]).any(dim=1).sum()
        else:
            error = (outputs - targets).double()
            sums[2] += error.abs().sum()
            sums[3] += (error**2).sum()
            targets_all.append(targets.double())
        count += targets.shape[0]
    model.train()
    # .tolist() is a sync point: once per evaluation, not per batch.
    loss, (correct, top5, abs_error, sq_error) = total_loss.item() / count, sums.tolist()
    if task == "classification":
        metrics = {"val_loss": loss, "val_accuracy": correct / count}
        if top5:
            metrics["val_top5_accuracy"] = top5 / count
        return metrics
    target = torch.cat(targets_all)
    total_variance = ((target - target.mean()) ** 2).sum().item()
    return {
        "val_loss": loss,
        "val_mae": abs_error / count / target.shape[1],
        "val_rmse": (sq_error / count / target.shape[1]) ** 0.5,
        "val_r2": 1.0 - sq_error / total_variance if total_variance > 0 else float("nan"),
    }


class _ScalarBuffer:
    """Per-step losses kept on the device and written to TensorBoard in one transfer.

    Calling ``loss.item()`` every step would stall a GPU on each step; instead losses are
    stacked and copied to the host when progress is reported.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.wall_times: list[float] = []

    def add(self, step: int, value: torch.Tensor) -> None:
        """Keep ``value`` (a 0-dim tensor, on any device) for ``step``, stamped with the wall time now."""
        self.steps.append(step)
        self.values.append(value.detach())
        self.wall_times.append(time.time())  # the step's own time, not the later drain's

    def drain(self, writer: SummaryWriter, tag: str) -> list[tuple[int, float]]:
        """Write buffered points to ``writer`` under ``tag`` (non-finite ones too: TensorBoard
        shows the divergence); return them as ``(step, value)`` pairs, oldest first."""
        if not self.values:
            return []
        values = torch.stack(self.values).float().cpu().tolist()  # sync point
        points = list(zip(self.steps, values, strict=True))
        for (step, value), wall_time in zip(points, self.wall_times, strict=True):
            writer.add_scalar(tag, value, step, walltime=wall_time)
        self.steps, self.values, self.wall_times = [], [], []
        return points


def _coalesce_key(name: str) -> str | None:
    """Which waiting checkpoint upload a new one named ``name`` replaces: a newer ``step-*``
    replaces a waiting ``step-*``, ``best.pt`` a waiting ``best.pt``; ``final.pt`` none."""
    if name == FINAL_CHECKPOINT:
        return None
    return "best" if name == BEST_CHECKPOINT else "step"


def _weights_finite(model: nn.Module) -> bool:
    """True if every floating-point parameter and buffer of ``model`` is finite (one sync)."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _check_input_size(model: nn.Module, spec: JobSpec, device: torch.device) -> None:
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


class _NullWriter:
    """Stands in for the ``SummaryWriter`` on ranks other than 0: only rank 0 writes events."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


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


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm layer (1d/2d/3d, SyncBatchNorm): in training mode it
    needs more than one value per channel, so a batch of 1 sample fails or trains on noise."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def drop_last(spec: JobSpec, num_train: int, model: nn.Module | None, batch_size: int | None = None) -> bool:
    """Whether the training loader drops each epoch's last, incomplete batch (``spec.drop_last``).

    ``num_train`` and ``batch_size`` (default ``spec.batch_size``) are one process's share when a
    job runs on several GPUs.

    ``auto`` drops it only when it would hold exactly 1 sample and ``model`` has BatchNorm; the
    choice is a function of the spec and the data, so a resumed run counts the same steps.

    Raises:
        JobFailure: a batch of 1 sample would reach BatchNorm: ``batch_size`` 1, or
            ``drop_last: false`` with a last batch of 1.
    """
    batchnorm = model is not None and has_batchnorm(model)
    if batchnorm and spec.batch_size == 1:
        raise JobFailure(
            f"batch_size 1 cannot train model.arch {spec.model.arch!r}: its BatchNorm layers need at least 2 samples per batch"
        )
    last = num_train % (batch_size or spec.batch_size)
    if spec.drop_last == "auto":
        return batchnorm and last == 1
    if not spec.drop_last and batchnorm and last == 1:
        raise JobFailure(
            f"with {num_train} training samples and batch_size {spec.batch_size} the last batch of each epoch holds "
            f"1 sample, which the BatchNorm layers of model.arch {spec.model.arch!r} cannot train on: "
            'set drop_last to "auto" or true, or change batch_size'
        )
    return spec.drop_last


def _loaders(
    data: TrainingData,
    spec: JobSpec,
    device: torch.device,
    group: ProcessGroup = SINGLE_PROCESS,
    model: nn.Module | None = None,
) -> tuple[StatefulDataLoader, DistributedSampler, DataLoader]:
    performance = spec.performance
    common: dict[str, Any] = dict(
        batch_size=spec.batch_size // group.world_size,  # batch_size is the global batch
        num_workers=spec.num_workers,
        pin_memory=device.type == "cuda",  # with non_blocking copies: transfers overlap compute
        worker_init_fn=_seed_dataloader_worker,
        collate_fn=data.collate,
    )
    if spec.num_workers:
        common.update(persistent_workers=performance.persistent_workers, prefetch_factor=performance.prefetch_factor)
    # The shuffle is a function of (seed, epoch) — DistributedSampler's rule — so a resumed run
    # replays exactly the order an uninterrupted one would, and rank r of N takes positions
    # r, r + N, … of it (the union of the ranks' batches is the one-process batch). The loader
    # has its own generator so iterating it never draws from the global torch RNG.
    sampler = DistributedSampler(data.train, num_replicas=group.world_size, rank=group.rank, shuffle=True, seed=spec.seed)
    # drop_last looks at this rank's share: its samples and its part of the global batch.
    last_drop = drop_last(spec, len(sampler), model, batch_size=common["batch_size"])
    train = StatefulDataLoader(
        data.train, sampler=sampler, generator=torch.Generator().manual_seed(spec.seed), drop_last=last_drop, **common
    )
    # Validation forks its workers once per job, not once per epoch (a 20-epoch digits job spent
    # 7.5 s validating, 2.7-3.3 s with persistent workers; bench/README.md). Eval transforms draw
    # nothing random, and its own generator keeps its workers' seeds off the global RNG.
    val_options = common | ({"persistent_workers": True} if spec.num_workers else {})
    val = DataLoader(data.val, shuffle=False, generator=torch.Generator().manual_seed(spec.seed), **val_options)
    return train, sampler, val


class _Run:
    """State and helpers of one attempt at a job (in one process of it); :func:`run_rank` drives it."""

    def __init__(
        self, job_id: str, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks,
        group: ProcessGroup = SINGLE_PROCESS,
    ):
        self.job_id, self.spec, self.storage, self.settings, self.callbacks = job_id, spec, storage, settings, callbacks
        self.group = group
        self.workdir = settings.data_cache_dir / "jobs" / (job_id if group.is_main else f"{job_id}.rank{group.rank}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.tb_dir = self.workdir / "tensorboard"
        self.tb_uri = storage.job_uri(job_id, "tensorboard")
        self.uploader = BackgroundUploader(storage, settings.upload_deadline_s)
        self.progress = Progress(epochs=spec.epochs)
        self.metrics: dict[str, float] = {}
        self.batch_in_epoch = 0  # micro-batches of the current epoch already trained on
        self.saves = 0  # checkpoints written by this attempt
        self.last_checkpoint: str | None = None  # newest checkpoint (saved or resumed from): finite weights
        self.epoch_loss_sum, self.epoch_loss_steps = 0.0, 0  # this epoch's drained train losses
        self.runtime_before_s = 0.0  # training seconds of earlier attempts
        self.resumed_threads: int | None = None  # torch threads the checkpoint resumed from was trained with
        self.started = time.monotonic()
        self.start_step = 0
        self.last_progress = self.last_tb_upload = self.started
        # (monotonic time, step) of this attempt's first report after a step: the throughput is
        # measured from there, so the download, checks, model build and first step don't count.
        self.rate_origin: tuple[float, int] | None = None
        limits = [settings.max_runtime_s] + ([spec.max_runtime_s] if spec.max_runtime_s else [])
        self.max_runtime_s = min(limits)
        # Set up by _train once the data and model exist.
        self.data: TrainingData | None = None
        self.model: nn.Module | None = None  # the plain module: checkpoints, validation
        self.train_model: nn.Module | None = None  # what the loop calls: DDP- and/or compile-wrapped
        self.fast: FastPath | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.loader: StatefulDataLoader | None = None
        self.sampler: DistributedSampler | None = None
        self.val_loader: DataLoader | None = None
        self.loss_fn: nn.Module | None = None
        self.trackers: dict[str, MetricTracker] = {}

    @property
    def runtime_s(self) -> float:
        """Training seconds so far, this attempt and earlier ones."""
        return self.runtime_before_s + time.monotonic() - self.started

    def local_stop_reason(self) -> StopReason | None:
        """Rank 0's answer (cancel, shutdown, lost lease, time limit); None on the other ranks.

        Not a collective: what rank 0 alone asks while the others wait (data preparation, validation).
        """
        if not self.group.is_main:
            return None
        reason = self.callbacks.stop_requested()
        if reason is None and self.runtime_s >= self.max_runtime_s:
            reason = StopReason.TIME_LIMIT
        return reason

    def stop_reason(self) -> StopReason | None:
        """Rank 0's answer (cancel, shutdown, lost lease, time limit), the same on every rank (a
        collective when several processes train)."""
        reason = self.local_stop_reason()
        if not self.group.distributed:
            return reason
        reasons = list(StopReason)
        code = self.group.share_int(0 if reason is None else reasons.index(reason) + 1)
        return reasons[code - 1] if code else None

    def show_phase(
        self,
        phase: JobPhase,
        files_done: int | None = None,
        files_total: int | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> None:
        """Record what the job is doing: written at once when the phase changes or its files are all done,
        else at most every ``progress_interval_s``."""
        changed = phase != self.progress.phase or (files_total is not None and files_done == files_total)
        self.progress.phase = phase
        self.progress.files_done, self.progress.files_total = files_done, files_total
        self.progress.bytes_done, self.progress.bytes_total = bytes_done, bytes_total
        now = time.monotonic()
        if changed or now - self.last_progress >= self.settings.progress_interval_s:
            self.progress.runtime_s = self.runtime_s
            self.progress.updated_at = time.time()
            self.callbacks.on_progress(self.progress.model_copy())
            self.last_progress = now

    def _abort_earlier_uploads(self) -> None:
        try:
            aborted = self.storage.abort_incomplete_uploads(self.storage.job_uri(self.job_id))
        except ClientError as exc:  # e.g. no s3:AbortMultipartUpload permission: not worth failing the job
            logger.warning("job %s: could not abort earlier incomplete uploads: %s", self.job_id, public_message(exc))
            return
        for key in aborted:
            logger.info("job %s: aborted the incomplete upload of %s left by an earlier attempt", self.job_id, key)

    @in_stage("resume")
    def resume(self) -> str | None:
        """Restore the newest loadable checkpoint of this job, if any; return its URI.

        First aborts the multipart uploads an earlier attempt left open (a worker killed mid-upload):
        their parts are stored, and billed on AWS, until aborted.
        """
        if self.group.is_main:
            self._abort_earlier_uploads()
        for uri in checkpoint_uris(self.storage, self.job_id):
            path = self.workdir / "resume.pt"
            try:
                # Onto the CPU: load_state_dict copies weights and optimizer state to the model's device,
                # while the RNG and loader states must stay CPU tensors (numpy cannot read a CUDA one).
                checkpoint = load_checkpoint(self.storage.download_file(uri, path), map_location="cpu")
            except Exception as exc:  # never expected (S3 writes are atomic), but an older one will do
                if classify(exc) is Fault.TRANSIENT:
                    raise  # S3 unreachable: retry the job later rather than start it over
                logger.exception("job %s: checkpoint %s unreadable; trying an older one", self.job_id, uri)
                continue
            finally:
                path.unlink(missing_ok=True)
            if checkpoint["classes"] != self.data.classes:
                raise JobFailure(
                    f"cannot resume: {self.spec.dataset.uri} now has classes {self.data.classes}, "
                    f"checkpoint {uri} was trained on {checkpoint['classes']}"
                )
            saved_world = checkpoint.get("world_size", 1)
            if saved_world != self.group.world_size:
                raise JobFailure(
                    f"cannot resume: checkpoint {uri} was written by {saved_world} training process(es) "
                    f"(resources.gpus); this run has {self.group.world_size}"
                )
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.fast.load_state_dict(checkpoint.get("scaler"))
            if self.scheduler is not None:
                self.scheduler.load_state_dict(checkpoint["scheduler"])
            for name, tracker in self.trackers.items():
                tracker.load_state_dict(checkpoint["trackers"][name])
            # Rank 0's loader position and RNG states are the checkpoint's own; the others' are kept beside.
            own = checkpoint if self.group.is_main else checkpoint["rank_states"][self.group.rank - 1]
            if own["loader"] is not None:
                self.loader.load_state_dict(own["loader"])
            restore_rng_state(own["rng"])
            self.progress.epoch, self.progress.step = checkpoint["epoch"], checkpoint["step"]
            self.batch_in_epoch = checkpoint["batch_in_epoch"]
            self.start_step = checkpoint["step"]
            self.metrics = dict(checkpoint["metrics"])
            self._show_metrics()
            self.runtime_before_s = checkpoint["runtime_s"]
            self.resumed_threads = checkpoint.get("torch_threads")  # absent before threads were recorded
            self.epoch_loss_sum, self.epoch_loss_steps = checkpoint.get("epoch_loss", (0.0, 0))
            self.last_checkpoint = uri
            logger.info("job %s: resuming from %s (epoch %d, step %d)", self.job_id, uri, checkpoint["epoch"], checkpoint["step"])
            return uri
        return None

    def _show_metrics(self) -> None:
        # Non-finite values (an r2 of a constant target) are left out of the record: JSON has no NaN.
        shown = {k: v for k, v in self.metrics.items() if math.isfinite(v)}
        self.progress.val_metrics = {k: v for k, v in shown.items() if k.startswith("val_")}
        self.progress.val_loss = shown.get("val_loss")
        self.progress.val_accuracy = shown.get("val_accuracy")
        self.progress.train_epoch_loss = shown.get("train_epoch_loss")

    def record_validation(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        self._show_metrics()

    @in_stage("checkpoint")
    def checkpoint(self, writer: SummaryWriter, name: str, *, mid_epoch: bool = False) -> str | None:
        """Snapshot a checkpoint at this step boundary and queue its write and upload; return
        the URI it will have.

        The loop pays for the weights check and a copy of the state to CPU memory
        (:class:`~worker.training.checkpoint.Snapshot`); ``torch.save`` and the upload run on the
        upload thread, and the job's record names the checkpoint only once it is in S3
        (``on_checkpoint``). Back-pressure is skip-and-coalesce, not wait: one checkpoint uploads
        at a time, and a newer ``step-*`` (or ``best.pt``) replaces one of its kind still
        waiting, so a slow or unreachable S3 never holds training (the uploader's design) and at
        most one snapshot of each kind waits in memory; what a crash can lose is bounded by the
        upload time instead of ``checkpoint.every_steps``. ``final.pt`` is never replaced.

        The TensorBoard events up to this step are queued first: uploads run in order, so once
        a checkpoint is in S3, so are the events a resume from it relies on (its ``purge_step``
        drops only what came after). ``mid_epoch`` also saves the DataLoader's position.
        With several processes every rank calls this: rank 0 gathers the others' RNG states and
        loader positions into its checkpoint and writes it; the others return None.

        Raises:
            JobFailure: the weights are nan or inf.
            UploadError: an earlier upload (or checkpoint write) has failed.
        """
        self.uploader.raise_if_failed()  # no use training on when nothing more can be saved
        rank_states = None
        if self.group.distributed:
            own = {"loader": self.loader.state_dict() if mid_epoch else None, "rng": capture_rng_state()}
            rank_states = self.group.gather(own)
            if not self.group.is_main:
                return None
        self.upload_tensorboard(writer)
        if not _weights_finite(self.model):
            raise JobFailure(
                f"the weights became nan or inf by step {self.progress.step}, epoch {self.epoch_of(self.progress.step)}; "
                f"last finite checkpoint: {self.last_checkpoint or 'none'}"
            )
        # A local file per save: `best.pt` may be saved again while its last upload still waits.
        self.saves += 1
        path = self.workdir / "checkpoints" / f"{self.saves:06d}-{name}"
        snapshot = Snapshot(checkpoint_payload(
            job_id=self.job_id,
            model=self.model,
            optimizer=self.optimizer,
            epoch=self.progress.epoch,
            step=self.progress.step,
            metrics=self.metrics,
            spec=self.spec.model_dump(mode="json"),
            classes=self.data.classes,
            runtime_s=self.runtime_s,
            loader_state=self.loader.state_dict() if mid_epoch else None,
            extra={
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "trackers": {name: tracker.state_dict() for name, tracker in self.trackers.items()},
                "batch_in_epoch": self.batch_in_epoch if mid_epoch else 0,
                "data": self.data.metadata,
                "scaler": self.fast.state_dict(),
                "world_size": self.group.world_size,
                "torch_threads": torch.get_num_threads(),  # a resume trains with the same (bit-identical results)
                "rank_states": rank_states[1:] if rank_states else [],
                "epoch_loss": [self.epoch_loss_sum, self.epoch_loss_steps] if mid_epoch else [0.0, 0],
            },
        ))
        uri = self.storage.job_uri(self.job_id, "checkpoints", name)
        self.last_checkpoint = uri
        self.uploader.submit_file(
            path, uri, on_done=lambda: self._checkpoint_uploaded(uri),
            write=lambda: write_checkpoint(path, snapshot), coalesce=_coalesce_key(name),
        )
        return uri

    def _checkpoint_uploaded(self, uri: str) -> None:
        """Report ``uri``; then, with ``checkpoint.keep_last``, delete the step checkpoints it makes stale."""
        self.callbacks.on_checkpoint(uri)
        if self.spec.checkpoint.keep_last is not None and _STEP_CHECKPOINT.search(uri):
            steps = [u for u in checkpoint_uris(self.storage, self.job_id) if _STEP_CHECKPOINT.search(u)]
            for stale in stale_checkpoints(steps, self.spec.checkpoint.keep_last):
                if delete_checkpoint(self.storage, stale):
                    self.callbacks.on_checkpoint_deleted(stale)

    @in_stage("upload")
    def drain(self, *, stoppable: bool = True, max_wait_s: float | None = None) -> bool:
        """Wait for every upload; True once all are in S3.

        With ``stoppable``, a cancel, shutdown or lost lease while S3 is slow or down ends the
        wait with :class:`TrainingStopped` (a later attempt resumes from the newest complete
        checkpoint). With ``max_wait_s``, give up waiting after that many seconds (False).
        """
        if not self.group.is_main:
            return True  # only rank 0 uploads
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        while not self.uploader.drain(timeout_s=self.settings.cancel_poll_interval_s):
            reason = self.callbacks.stop_requested() if stoppable else None
            if reason is not None:
                logger.warning("job %s: %s while uploads were pending; not waiting for them", self.job_id, reason.value)
                raise TrainingStopped(reason, self.progress.step, self.runtime_s, None)
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("job %s: uploads still pending after %.0f s; not waiting longer", self.job_id, max_wait_s)
                return False
        return True

    def upload_tensorboard(self, writer: SummaryWriter) -> None:
        if not self.group.is_main:
            return
        writer.flush()
        self.uploader.submit_snapshot(self.tb_dir, self.tb_uri, key="tensorboard")
        self.last_tb_upload = time.monotonic()

    def epoch_of(self, step: int) -> int:
        """The epoch (1-based) that optimizer step ``step`` (1-based) belongs to."""
        return max(1, math.ceil(step / max(self.progress.steps_per_epoch, 1)))

    def drain_losses(self, writer: SummaryWriter, losses: _ScalarBuffer) -> None:
        """Copy the buffered train losses off the device (one sync), log them, check them.

        Raises:
            JobFailure: a loss is nan or inf (the job diverged), naming its step and epoch and
                the newest checkpoint with finite weights.
        """
        points = losses.drain(writer, "train/loss")
        if not points:
            return
        bad = next(((step, value) for step, value in points if not math.isfinite(value)), None)
        if bad is not None:
            step, value = bad
            raise JobFailure(
                f"loss became {value} at step {step}, epoch {self.epoch_of(step)}; "
                f"last finite checkpoint: {self.last_checkpoint or 'none'} (lower optimizer.lr, or set grad_clip_norm)"
            )
        self.progress.train_loss = self.metrics["train_loss"] = points[-1][1]
        self.epoch_loss_sum += sum(value for _, value in points)
        self.epoch_loss_steps += len(points)

    def end_epoch_loss(self, writer: SummaryWriter, losses: _ScalarBuffer) -> None:
        """Log the mean train loss of the epoch just finished (``train/epoch_loss``) and reset it."""
        self.drain_losses(writer, losses)
        if self.epoch_loss_steps:
            mean = self.epoch_loss_sum / self.epoch_loss_steps
            self.progress.train_epoch_loss = self.metrics["train_epoch_loss"] = mean
            writer.add_scalar("train/epoch_loss", mean, self.progress.step)
        self.epoch_loss_sum, self.epoch_loss_steps = 0.0, 0

    def report(self, writer: SummaryWriter, losses: _ScalarBuffer, *, force: bool = False) -> None:
        if not self.group.is_main:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < self.settings.progress_interval_s:
            return
        self.drain_losses(writer, losses)
        if self.rate_origin is None and self.progress.step > self.start_step:
            self.rate_origin = (now, self.progress.step)
        if self.rate_origin is not None and self.progress.step > self.rate_origin[1]:
            steps_per_s = (self.progress.step - self.rate_origin[1]) / max(now - self.rate_origin[0], 1e-9)
            samples_per_step = self.spec.batch_size * self.spec.grad_accumulation_steps
            self.progress.samples_per_s = steps_per_s * samples_per_step
            self.progress.eta_s = (self.progress.total_steps - self.progress.step) / steps_per_s
        self.progress.runtime_s = self.runtime_s
        self.progress.updated_at = time.time()
        self.callbacks.on_progress(self.progress.model_copy())
        self.last_progress = now
        if now - self.last_tb_upload >= self.settings.tensorboard_upload_interval_s:
            self.upload_tensorboard(writer)


def run_training(
    job_id: str,
    spec: JobSpec,
    storage: Storage,
    settings: Settings,
    callbacks: TrainingCallbacks | None = None,
) -> TrainResult:
    """Train ``spec`` (resuming from the job's newest checkpoint) and upload its artifacts.

    Artifacts go under ``<prefix>/<job_id>/``: ``tensorboard/`` (every epoch, every
    ``tensorboard_upload_interval_s`` seconds, and at the end — also when training fails),
    ``checkpoints/step-<step>.pt`` every ``spec.checkpoint`` interval, ``best.pt`` when
    ``checkpoint.best_metric`` improves, and ``final.pt``. Uploads run in the background; the
    function returns only once every artifact is in S3.

    Raises:
        TrainingStopped: cancelled, time limit, worker shutdown (a checkpoint was saved) or lease
            lost (nothing written).
        JobFailure: a fault of the job (its data, e.g. :class:`shared.exceptions.DatasetError`,
            or its spec, e.g. more ``resources.gpus`` than the worker has). Anything else is an
            infrastructure or programming error.

    With ``resources.gpus`` > 1 the job trains in that many processes, one per GPU
    (:mod:`worker.training.distributed`); this function then supervises them.
    """
    callbacks = callbacks or TrainingCallbacks()
    if spec.resources.gpus > 1:
        return launch(job_id, spec, settings, callbacks, spec.resources.gpus, _distributed_backend(spec, settings))
    return run_rank(job_id, spec, storage, settings, callbacks)


def _distributed_backend(spec: JobSpec, settings: Settings) -> str:
    """``nccl`` for a job on several GPUs, ``gloo`` for CPU processes where the worker allows them.

    Raises:
        JobFailure: the worker has fewer GPUs than ``resources.gpus`` (and no CPU processes are allowed).
    """
    gpus = spec.resources.gpus
    device = resolve_device(spec.device)
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if gpus > available:
            raise JobFailure(f"resources.gpus is {gpus} but this worker has {available} CUDA device(s)")
        return "nccl"
    if not settings.allow_cpu_ddp:
        where = "spec.device is 'cpu'" if spec.device == "cpu" else "this worker has no CUDA device"
        raise JobFailure(f"resources.gpus is {gpus} but {where}")
    return "gloo"


def run_rank(
    job_id: str, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks,
    group: ProcessGroup = SINGLE_PROCESS,
) -> TrainResult:
    """One process's part of :func:`run_training` (all of it in a one-process job): rank
    ``group.rank`` of ``group.world_size``, in a process group already initialized."""
    run = _Run(job_id, spec, storage, settings, callbacks, group)
    try:
        return _train(run, spec, storage, settings, callbacks)
    finally:
        try:
            run.uploader.close()
        finally:
            _stop_loader_workers(run.loader, run.val_loader)


def _stop_loader_workers(*loaders: DataLoader | None) -> None:
    """End the worker processes of ``loaders`` now.

    Persistent workers (the validation loader's always; the training loader's with
    ``performance.persistent_workers``) live as long as their loader's iterator, and a job's
    loaders can outlive the job (a traceback or a reference cycle holds them until the garbage
    collector runs): each idle worker would keep ~0.5 GB resident on a long-lived Celery worker.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers' iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            try:
                iterator._shutdown_workers()
            except Exception:  # never hide the job's own outcome behind a cleanup error
                logger.exception("could not stop DataLoader workers")
            loader._iterator = None


@dataclass
class Prepared:
    """Everything a job needs before its first step, from :func:`prepare`.

    ``loader`` yields this process's training batches ``(inputs, targets)`` of
    ``spec.batch_size / world_size`` (the last one may be smaller), shuffled by ``sampler`` per
    epoch; ``val_loader`` the validation set in order. ``model`` is on the device (NHWC weights
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
    loader: StatefulDataLoader
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
    try:
        data = load_data(spec, storage, settings.data_cache_dir / "datasets", settings.data_root, options)
    except DatasetError as exc:
        exc.field = exc.field or _dataset_field(str(exc), spec)
        raise
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
    _check_input_size(model, spec, device)
    per_process = spec.batch_size // spec.resources.gpus  # batch_size is the global batch
    memory = estimate_memory(model, spec, data.input_shape, budget_bytes, batch_size=per_process)
    check_memory(memory, spec, data.input_shape, batch_size=per_process)
    try:
        loss_fn = build_loss(spec, data.num_outputs).to(device)
    except ValueError as exc:  # a spec that does not fit the data (class_weights length…)
        raise JobFailure(str(exc), field="loss") from exc
    try:
        optimizer = build_optimizer(spec, model.parameters())
        loader, sampler, val_loader = _loaders(data, spec, device, group, model=model)
        steps_per_epoch = math.ceil(len(loader) / spec.grad_accumulation_steps)
        scheduler = build_scheduler(spec, optimizer, total_steps=spec.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    except ValueError as exc:
        raise JobFailure(str(exc)) from exc
    return Prepared(data, model, fast, loss_fn, optimizer, scheduler, loader, sampler, val_loader, steps_per_epoch, memory)


def _dataset_field(message: str, spec: JobSpec) -> str:
    """The dataset field whose URI a data error names (the longest URI found), else ``dataset.uri``."""
    dataset = spec.dataset
    named = [("dataset.uri", dataset.uri), ("dataset.val_uri", dataset.val_uri)]
    if not isinstance(dataset, CsvDataset):
        named += [(f"dataset.extra_uris.{i}", uri) for i, uri in enumerate(dataset.extra_uris)]
    found = [(len(uri.rstrip("/")), field) for field, uri in named if uri and uri.rstrip("/") in message]
    return max(found)[1] if found else "dataset.uri"


def _prepare(run: _Run, spec: JobSpec, storage: Storage, settings: Settings, device: torch.device) -> None:
    """:func:`prepare` for ``run`` (its phases shown in the record, stoppable by rank 0), then its trackers."""
    budget = memory_budget(settings, device)
    prepared = prepare(
        spec, storage, settings, device,
        budget_bytes=budget, should_stop=run.local_stop_reason, on_phase=run.show_phase, group=run.group,
    )
    run.data, run.model, run.fast, run.loss_fn = prepared.data, prepared.model, prepared.fast, prepared.loss_fn
    run.optimizer, run.scheduler = prepared.optimizer, prepared.scheduler
    run.loader, run.sampler, run.val_loader = prepared.loader, prepared.sampler, prepared.val_loader
    run.progress.steps_per_epoch = prepared.steps_per_epoch
    run.progress.total_steps = spec.epochs * prepared.steps_per_epoch
    if spec.checkpoint.best_metric is not None:
        run.trackers["best"] = MetricTracker(spec.checkpoint.best_metric)
    if spec.early_stopping is not None:
        run.trackers["early_stopping"] = MetricTracker(spec.early_stopping.metric, spec.early_stopping.min_delta)


def _train(run: _Run, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks) -> TrainResult:
    job_id, group = run.job_id, run.group
    seed_everything(spec.seed)
    device = resolve_device(spec.device)
    if device.type == "cuda" and group.distributed:
        device = torch.device("cuda", group.rank)
    configure_backends(spec.performance, device)
    threads = training_threads(spec.num_workers, settings.torch_threads, processes=group.world_size)
    torch.set_num_threads(threads)  # while preparing; the job's own count is chosen after the resume
    try:
        _prepare(run, spec, storage, settings, device)
    except Interrupted as stop:  # cancel, time limit or shutdown before training: nothing to save
        raise TrainingStopped(stop.reason, run.progress.step, run.runtime_s, None) from None
    if group.rank:
        seed_everything(spec.seed + group.rank)  # own dropout masks per rank (the model is rank 0's)
    data, model, optimizer, loader, loss_fn, fast = run.data, run.model, run.optimizer, run.loader, run.loss_fn, run.fast
    resumed_from = run.resume()
    _choose_threads(run, spec, settings, device, threads)
    train_model = training_module(model, spec.performance, device, group.distributed)
    if group.is_main:
        callbacks.on_start(
            device=describe_device(device) if not group.distributed else f"{group.world_size} × {describe_device(device)}",
            dataset=DatasetInfo(
                task=data.task, classes=data.classes, num_train=len(data.train), num_val=len(data.val),
                features=data.metadata.get("features"),
            ),
            tensorboard_uri=run.tb_uri + "/",
            resumed_from=resumed_from,
        )
    logger.info(
        "job %s: training on %s in %s%s from step %d of %d", job_id, device, fast.precision,
        ", channels_last" if fast.channels_last else "", run.progress.step, run.progress.total_steps,
    )

    # purge_step: TensorBoard drops events at or after it from an earlier attempt's files, so a
    # resumed job shows each step once (one run per job, however many attempts). An attempt that
    # starts from scratch purges everything an earlier one may have uploaded before it died.
    writer = (
        SummaryWriter(log_dir=str(run.tb_dir), purge_step=run.progress.step + 1 if resumed_from else 0)
        if group.is_main else _NullWriter()
    )
    run.show_phase(JobPhase.TRAINING)
    accumulate = spec.grad_accumulation_steps
    try:
        losses = _ScalarBuffer()
        micro_losses: list[torch.Tensor] = []
        model.train()
        for epoch in range(run.progress.epoch, spec.epochs):
            run.sampler.set_epoch(epoch)
            data.set_epoch(epoch)
            batches = len(loader)
            for inputs, targets in loader:
                inputs, targets = fast.to_device(inputs, targets)
                if run.progress.step == 0 and run.batch_in_epoch == 0 and inputs.dim() == 4:
                    writer.add_image("inputs", make_grid(inputs[:64].cpu(), nrow=8, normalize=True), 0)
                group_start = (run.batch_in_epoch // accumulate) * accumulate
                group_size = min(accumulate, batches - group_start)  # the epoch's last group may be short
                run.batch_in_epoch += 1
                stepping = run.batch_in_epoch - group_start >= group_size
                with _gradient_sync(train_model, stepping):
                    with fast.autocast():
                        loss = loss_fn(train_model(inputs), targets)
                    fast.backward(loss / group_size if group_size > 1 else loss)
                micro_losses.append(loss.detach())
                if not stepping:
                    continue  # accumulate more micro-batches before stepping
                if spec.grad_clip_norm is not None:
                    fast.unscale(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
                fast.step(optimizer)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], run.progress.step + 1)  # the lr this step used
                if run.scheduler is not None:
                    run.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                run.progress.step += 1
                losses.add(run.progress.step, torch.stack(micro_losses).mean() if len(micro_losses) > 1 else micro_losses[0])
                micro_losses = []
                reason = run.stop_reason()
                if reason is not None:
                    _stop(run, reason, writer, losses)
                every = spec.checkpoint.every_steps
                if every and run.progress.step % every == 0:
                    run.report(writer, losses, force=True)
                    run.checkpoint(writer, f"step-{run.progress.step:09d}.pt", mid_epoch=True)
                run.report(writer, losses)
            run.progress.epoch, run.batch_in_epoch = epoch + 1, 0
            stop_early = _end_epoch(run, writer, losses, loss_fn, device)
            if stop_early:
                break
        writer.close()
        run.show_phase(JobPhase.UPLOADING)
        final_uri = run.checkpoint(writer, FINAL_CHECKPOINT)
        run.drain()  # the job is not done until its artifacts are in S3
    except TrainingStopped:
        writer.close()
        raise
    except BaseException as exc:
        step = run.progress.step + 1  # the step being taken (unless an inner stage was named)
        mark_stage(exc, f"step {step} (epoch {run.epoch_of(step)})")
        # The events written so far are still worth having; but never hide the training error
        # behind an upload error.
        writer.close()
        try:
            run.upload_tensorboard(writer)
            run.drain()
        except Exception:
            logger.exception("job %s: TensorBoard upload after failure failed", job_id)
        raise
    return TrainResult(
        final_checkpoint=final_uri,
        epochs=run.progress.epoch,
        steps=run.progress.step,
        val_loss=run.metrics.get("val_loss", float("nan")),
        val_accuracy=run.metrics.get("val_accuracy", float("nan")),
        runtime_s=run.runtime_s,
        metrics=dict(run.metrics),
    )


def _choose_threads(run: _Run, spec: JobSpec, settings: Settings, device: torch.device, static: int) -> int:
    """Set and return the torch threads of the whole job (every attempt), after its resume.

    ``TORCH_THREADS`` wins; else the count the resumed checkpoint was trained with (CPU kernels
    give different floating-point results at different thread counts, so a resume with another
    count would not be bit-identical), if this worker has that many CPUs; else, on a fresh
    one-process CPU job whose DataLoader workers hold cores torch could use, the probe's choice
    (:func:`worker.training.cpu.probe_threads`); else ``static`` (usable CPUs − workers).
    """
    threads = static
    if settings.torch_threads:
        pass
    elif run.resumed_threads is not None:
        if run.resumed_threads <= usable_cpus():
            threads = run.resumed_threads
        else:
            logger.warning("job %s: resumed from a run with %d torch threads; this worker has %d CPUs, so %d (not bit-identical)",
                           run.job_id, run.resumed_threads, usable_cpus(), static)
    elif device.type == "cpu" and not run.group.distributed and spec.num_workers and usable_cpus() > static:
        rng = capture_rng_state()  # dropout and any unseeded transform in the probe draw from these
        try:
            choice = probe_threads(
                num_workers=spec.num_workers, batch_size=spec.batch_size, load_sample=run.data.train.__getitem__,
                num_samples=len(run.data.train), train_step=_probe_step(run, spec),
            )
        finally:
            restore_rng_state(rng)
        threads = choice.threads
        logger.info("job %s: %s: %d torch thread(s)", run.job_id, choice.describe(), threads)
    torch.set_num_threads(threads)
    logger.info("job %s: %d torch thread(s) beside %d DataLoader worker(s)", run.job_id, threads, spec.num_workers)
    return threads


def _probe_step(run: _Run, spec: JobSpec) -> Callable[[list[Any]], None]:
    """A training step for the thread probe that leaves the job as it was: a copy of the model, an
    optimizer of its own, every RNG state put back. The samples are collated once and repeated
    to a full ``batch_size``."""
    model = copy.deepcopy(run.model).train()
    optimizer = build_optimizer(spec, model.parameters())
    batch: list[torch.Tensor] = []

    def step(samples: list[Any]) -> None:
        if not batch:
            inputs, targets = run.data.collate(samples)
            repeats = math.ceil(spec.batch_size / len(samples))
            batch.extend(run.fast.to_device(torch.cat([inputs] * repeats)[: spec.batch_size], torch.cat([targets] * repeats)[: spec.batch_size]))
        with run.fast.autocast():
            loss = run.loss_fn(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _gradient_sync(train_model: nn.Module, stepping: bool) -> AbstractContextManager:
    """Context for a micro-batch's forward and backward: DDP's ``no_sync`` when the micro-batch
    does not end its accumulation group (its gradients are all-reduced with the last one's)."""
    ddp = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if stepping or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return ddp.no_sync()


def _end_epoch(run: _Run, writer: SummaryWriter, losses: _ScalarBuffer, loss_fn: nn.Module, device: torch.device) -> bool:
    """Validate, log, keep the best checkpoint, checkpoint on schedule; True to stop early.

    With several processes rank 0 validates and shares the metrics, so every rank takes the same
    decisions (best checkpoint, early stop) and joins the same checkpoints.
    """
    spec, step, epoch = run.spec, run.progress.step, run.progress.epoch
    run.end_epoch_loss(writer, losses)  # a diverged epoch fails here, before validation and checkpoints
    run.show_phase(JobPhase.VALIDATING)
    metrics, stopped = None, None
    if run.group.is_main:
        try:
            metrics = evaluate(
                run.model, run.val_loader, loss_fn, device, run.data.task, run.fast, should_stop=run.local_stop_reason
            )
        except Interrupted as stop:  # the epoch's training is kept: a resumed job starts the next epoch
            stopped = stop.reason
    metrics, stopped = run.group.share((metrics, stopped))
    if stopped is not None:
        _stop(run, stopped, writer, losses)  # on every rank: they all join the stop checkpoint
    run.progress.phase = JobPhase.TRAINING
    run.record_validation(metrics)
    for name, value in metrics.items():
        writer.add_scalar(f"val/{name.removeprefix('val_')}", value, step)
    writer.add_scalar("train/epoch", epoch, step)
    stop_early = False
    if "early_stopping" in run.trackers:
        tracker = run.trackers["early_stopping"]
        tracker.update(metrics)
        stop_early = tracker.stale_epochs >= spec.early_stopping.patience and epoch < spec.epochs
        run.progress.early_stopped = stop_early
    run.report(writer, losses, force=True)
    if run.group.is_main:
        logger.info("job %s: epoch %d/%d %s", run.job_id, epoch, spec.epochs, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if "best" in run.trackers and run.trackers["best"].update(metrics):
        run.checkpoint(writer, BEST_CHECKPOINT)
    if epoch % spec.checkpoint.every_epochs == 0 and epoch < spec.epochs and not stop_early:
        run.checkpoint(writer, f"step-{step:09d}.pt")
    else:
        run.upload_tensorboard(writer)
    if stop_early:
        logger.info("job %s: early stopping after epoch %d: %s stopped improving", run.job_id, epoch, spec.early_stopping.metric)
    return stop_early


def _stop(run: _Run, reason: StopReason, writer: SummaryWriter, losses: _ScalarBuffer) -> NoReturn:
    """End the run at this step boundary: checkpoint and upload (unless the lease is lost), raise."""
    logger.warning("job %s: stopping at step %d: %s", run.job_id, run.progress.step, reason.value)
    uri = None
    if reason.saves_checkpoint:
        run.report(writer, losses, force=True)
        writer.close()
        # Between epochs (stopped while validating) the DataLoader has no position to keep.
        uri = run.checkpoint(writer, f"step-{run.progress.step:09d}.pt", mid_epoch=run.batch_in_epoch > 0)
        # Give the checkpoint and events a minute to land; an S3 outage must not hold a cancel.
        if not run.drain(stoppable=False, max_wait_s=STOP_UPLOAD_WAIT_S):
            uri = None
    raise TrainingStopped(reason, run.progress.step, run.runtime_s, uri)
