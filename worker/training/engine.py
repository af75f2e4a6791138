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

import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.utils import make_grid

from shared.exceptions import JobFailure
from shared.jobs import DatasetInfo, Progress
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.training.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from worker.training.data import ImageData, load_image_folder
from worker.training.models import build_model
from worker.training.uploads import BackgroundUploader

logger = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final.pt"
_STEP_CHECKPOINT = re.compile(r"step-(\d+)\.pt$")


class StopReason(str, Enum):
    """Why a run stopped before the end of its last epoch."""

    CANCELLED = "cancelled"
    TIME_LIMIT = "time limit"
    SHUTDOWN = "worker shutdown"
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
        """Called every ``progress_interval_s`` seconds and after every epoch."""

    def on_checkpoint(self, uri: str) -> None:
        """A checkpoint is complete in S3 at ``uri``."""

    def stop_requested(self) -> StopReason | None:
        """Polled after every optimizer step; must be cheap (no I/O). None means go on."""
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


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> tuple[float, float]:
    """Mean loss per sample and accuracy (0..1) of ``model`` over ``loader``, in eval mode."""
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        total_loss += loss_fn(logits, labels) * labels.numel()
        correct += (logits.argmax(dim=1) == labels).sum()
        count += labels.numel()
    model.train()
    # .item() is a sync point: once per evaluation, not per batch.
    return total_loss.item() / count, correct.item() / count


class _ScalarBuffer:
    """Per-step losses kept on the device and written to TensorBoard in one transfer.

    Calling ``loss.item()`` every step would stall a GPU on each step; instead losses are
    stacked and copied to the host when progress is reported.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []

    def add(self, step: int, value: torch.Tensor) -> None:
        self.steps.append(step)
        self.values.append(value.detach())

    def drain(self, writer: SummaryWriter, tag: str) -> float | None:
        """Write buffered points to ``writer`` under ``tag``; return the newest value."""
        if not self.values:
            return None
        values = torch.stack(self.values).float().cpu().tolist()  # sync point
        for step, value in zip(self.steps, values, strict=True):
            writer.add_scalar(tag, value, step)
        self.steps, self.values = [], []
        return values[-1]


def _check_input_size(model: nn.Module, spec: JobSpec, device: torch.device) -> None:
    """Run one tiny batch through ``model`` so a size it cannot take fails now, naming the field.

    Some architectures need a minimum or fixed input (``vit_b_16``: 224 px; ``alexnet``: 63 px).
    The probe runs in eval mode under ``fork_rng``, so it changes neither BatchNorm statistics nor
    any random state.

    Raises:
        JobFailure: the forward pass failed for ``(2, channels, image_size, image_size)`` input.
    """
    size, channels = spec.dataset.image_size, spec.dataset.channels
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            model(torch.zeros(2, channels, size, size, device=device))
        except Exception as exc:
            raise JobFailure(
                f"model.arch {spec.model.arch!r} cannot take {channels}x{size}x{size} images "
                f"(dataset.image_size={size}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            model.train()


def _loaders(data: ImageData, spec: JobSpec, device: torch.device) -> tuple[StatefulDataLoader, DistributedSampler, DataLoader]:
    common: dict[str, Any] = dict(
        batch_size=spec.batch_size,
        num_workers=spec.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_dataloader_worker,
    )
    # The shuffle is a function of (seed, epoch) — DistributedSampler's rule, and the one DDP
    # will need — so a resumed run replays exactly the order an uninterrupted one would. The
    # loader has its own generator so iterating it never draws from the global torch RNG.
    sampler = DistributedSampler(data.train, num_replicas=1, rank=0, shuffle=True, seed=spec.seed)
    train = StatefulDataLoader(data.train, sampler=sampler, generator=torch.Generator().manual_seed(spec.seed), **common)
    val = DataLoader(data.val, shuffle=False, **common)
    return train, sampler, val


class _Run:
    """State and helpers of one attempt at a job; :func:`run_training` drives it."""

    def __init__(self, job_id: str, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks):
        self.job_id, self.spec, self.storage, self.settings, self.callbacks = job_id, spec, storage, settings, callbacks
        self.workdir = settings.data_cache_dir / "jobs" / job_id
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.tb_dir = self.workdir / "tensorboard"
        self.tb_uri = storage.job_uri(job_id, "tensorboard")
        self.uploader = BackgroundUploader(storage, settings.upload_deadline_s)
        self.progress = Progress(epochs=spec.epochs)
        self.metrics: dict[str, float] = {}
        self.runtime_before_s = 0.0  # training seconds of earlier attempts
        self.started = time.monotonic()
        self.start_step = 0
        self.last_progress = self.last_tb_upload = self.started
        limits = [settings.max_runtime_s] + ([spec.max_runtime_s] if spec.max_runtime_s else [])
        self.max_runtime_s = min(limits)

    @property
    def runtime_s(self) -> float:
        """Training seconds so far, this attempt and earlier ones."""
        return self.runtime_before_s + time.monotonic() - self.started

    def stop_reason(self) -> StopReason | None:
        reason = self.callbacks.stop_requested()
        if reason is None and self.runtime_s >= self.max_runtime_s:
            reason = StopReason.TIME_LIMIT
        return reason

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: StatefulDataLoader, classes: list[str], device: torch.device) -> str | None:
        """Restore the newest loadable checkpoint of this job, if any; return its URI."""
        for uri in checkpoint_uris(self.storage, self.job_id):
            path = self.workdir / "resume.pt"
            try:
                checkpoint = load_checkpoint(self.storage.download_file(uri, path), map_location=device)
            except Exception:  # never expected (S3 writes are atomic), but an older one will do
                logger.exception("job %s: checkpoint %s unreadable; trying an older one", self.job_id, uri)
                continue
            finally:
                path.unlink(missing_ok=True)
            if checkpoint["classes"] != classes:
                raise JobFailure(
                    f"cannot resume: {self.spec.dataset.uri} now has classes {classes}, "
                    f"checkpoint {uri} was trained on {checkpoint['classes']}"
                )
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint["loader"] is not None:
                loader.load_state_dict(checkpoint["loader"])
            restore_rng_state(checkpoint["rng"])
            self.progress.epoch, self.progress.step = checkpoint["epoch"], checkpoint["step"]
            self.start_step = checkpoint["step"]
            self.metrics = dict(checkpoint["metrics"])
            self.progress.val_loss = self.metrics.get("val_loss")
            self.progress.val_accuracy = self.metrics.get("val_accuracy")
            self.runtime_before_s = checkpoint["runtime_s"]
            logger.info("job %s: resuming from %s (epoch %d, step %d)", self.job_id, uri, checkpoint["epoch"], checkpoint["step"])
            return uri
        return None

    def checkpoint(
        self,
        writer: SummaryWriter,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        classes: list[str],
        name: str,
        loader: StatefulDataLoader | None = None,
    ) -> str:
        """Save a checkpoint locally and queue its upload; return the URI it will have.

        The TensorBoard events up to this step are queued first: uploads run in order, so once
        a checkpoint is in S3, so are the events a resume from it relies on (its ``purge_step``
        drops only what came after).
        """
        self.upload_tensorboard(writer)
        path = save_checkpoint(
            self.workdir / "checkpoints" / name,
            job_id=self.job_id,
            model=model,
            optimizer=optimizer,
            epoch=self.progress.epoch,
            step=self.progress.step,
            metrics=self.metrics,
            spec=self.spec.model_dump(mode="json"),
            classes=classes,
            runtime_s=self.runtime_s,
            loader_state=loader.state_dict() if loader is not None else None,
        )
        uri = self.storage.job_uri(self.job_id, "checkpoints", name)
        self.uploader.submit_file(path, uri, on_done=lambda: self.callbacks.on_checkpoint(uri))
        return uri

    def upload_tensorboard(self, writer: SummaryWriter) -> None:
        writer.flush()
        self.uploader.submit_snapshot(self.tb_dir, self.tb_uri, key="tensorboard")
        self.last_tb_upload = time.monotonic()

    def report(self, writer: SummaryWriter, losses: _ScalarBuffer, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < self.settings.progress_interval_s:
            return
        latest = losses.drain(writer, "train/loss")
        if latest is not None:
            self.progress.train_loss = latest
            self.metrics["train_loss"] = latest
        elapsed = max(now - self.started, 1e-9)
        done = self.progress.step - self.start_step
        self.progress.samples_per_s = done * self.spec.batch_size / elapsed if done else None
        self.progress.eta_s = (self.progress.total_steps - self.progress.step) * elapsed / done if done else None
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
    ``tensorboard_upload_interval_s`` seconds, and at the end — also when training fails) and
    ``checkpoints/step-<step>.pt`` every ``spec.checkpoint`` interval, plus ``final.pt``. Uploads
    run in the background; the function returns only once every artifact is in S3.

    Raises:
        TrainingStopped: cancelled, time limit, worker shutdown (a checkpoint was saved) or lease
            lost (nothing written).
        JobFailure: a fault of the job (its data, e.g. :class:`shared.exceptions.DatasetError`,
            or its spec). Anything else is an infrastructure or programming error.
    """
    callbacks = callbacks or TrainingCallbacks()
    run = _Run(job_id, spec, storage, settings, callbacks)
    try:
        return _train(run, spec, storage, settings, callbacks)
    finally:
        run.uploader.close()


def _train(run: _Run, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks) -> TrainResult:
    job_id = run.job_id
    seed_everything(spec.seed)
    device = resolve_device(spec.device)
    data = load_image_folder(spec.dataset, storage, settings.data_cache_dir / "datasets", spec.seed)
    num_classes = spec.model.num_classes or len(data.classes)
    if num_classes != len(data.classes):
        raise JobFailure(
            f"model.num_classes is {num_classes} but {spec.dataset.uri} has {len(data.classes)} classes: {data.classes}"
        )
    model = build_model(spec.model, num_classes=num_classes, in_channels=spec.dataset.channels).to(device)
    _check_input_size(model, spec, device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.loss.label_smoothing)
    opt = spec.optimizer
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    train_loader, sampler, val_loader = _loaders(data, spec, device)
    resumed_from = run.resume(model, optimizer, train_loader, data.classes, device)
    run.progress.steps_per_epoch = len(train_loader)
    run.progress.total_steps = spec.epochs * len(train_loader)
    callbacks.on_start(
        device=describe_device(device),
        dataset=DatasetInfo(classes=data.classes, num_train=len(data.train), num_val=len(data.val)),
        tensorboard_uri=run.tb_uri + "/",
        resumed_from=resumed_from,
    )
    logger.info("job %s: training on %s from step %d of %d", job_id, device, run.progress.step, run.progress.total_steps)

    # purge_step: TensorBoard drops events at or after it from an earlier attempt's files, so a
    # resumed job shows each step once (one run per job, however many attempts).
    writer = SummaryWriter(log_dir=str(run.tb_dir), purge_step=run.progress.step + 1 if resumed_from else None)
    try:
        losses = _ScalarBuffer()
        model.train()
        for epoch in range(run.progress.epoch, spec.epochs):
            sampler.set_epoch(epoch)
            for images, labels in train_loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if run.progress.step == 0:
                    writer.add_image("inputs", make_grid(images[:64].cpu(), nrow=8, normalize=True), 0)
                logits = model(images)
                loss = loss_fn(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                run.progress.step += 1
                losses.add(run.progress.step, loss)
                reason = run.stop_reason()
                every = spec.checkpoint.every_steps
                if reason is not None:
                    _stop(run, reason, writer, losses, model, optimizer, data.classes, train_loader)
                if every and run.progress.step % every == 0:
                    run.report(writer, losses, force=True)
                    run.checkpoint(writer, model, optimizer, data.classes, f"step-{run.progress.step:09d}.pt", train_loader)
                run.report(writer, losses)
            run.progress.epoch = epoch + 1
            val_loss, val_accuracy = evaluate(model, val_loader, loss_fn, device)
            run.metrics.update(val_loss=val_loss, val_accuracy=val_accuracy)
            run.progress.val_loss, run.progress.val_accuracy = val_loss, val_accuracy
            step = run.progress.step
            writer.add_scalar("val/loss", val_loss, step)
            writer.add_scalar("val/accuracy", val_accuracy, step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            writer.add_scalar("train/epoch", epoch + 1, step)
            run.report(writer, losses, force=True)
            logger.info("job %s: epoch %d/%d val_loss %.4f val_accuracy %.4f", job_id, epoch + 1, spec.epochs, val_loss, val_accuracy)
            if (epoch + 1) % spec.checkpoint.every_epochs == 0 and epoch + 1 < spec.epochs:
                run.checkpoint(writer, model, optimizer, data.classes, f"step-{step:09d}.pt")
            else:
                run.upload_tensorboard(writer)
        writer.close()
        final_uri = run.checkpoint(writer, model, optimizer, data.classes, FINAL_CHECKPOINT)
        run.uploader.drain()  # the job is not done until its artifacts are in S3
    except TrainingStopped:
        writer.close()
        raise
    except BaseException:
        # The events written so far are still worth having; but never hide the training error
        # behind an upload error.
        writer.close()
        try:
            run.upload_tensorboard(writer)
            run.uploader.drain()
        except Exception:
            logger.exception("job %s: TensorBoard upload after failure failed", job_id)
        raise
    return TrainResult(
        final_checkpoint=final_uri,
        epochs=spec.epochs,
        steps=run.progress.step,
        val_loss=run.metrics.get("val_loss", float("nan")),
        val_accuracy=run.metrics.get("val_accuracy", float("nan")),
        runtime_s=run.runtime_s,
    )


def _stop(
    run: _Run,
    reason: StopReason,
    writer: SummaryWriter,
    losses: _ScalarBuffer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    classes: list[str],
    loader: StatefulDataLoader,
) -> None:
    """End the run at this step boundary: checkpoint and upload (unless the lease is lost), raise."""
    logger.warning("job %s: stopping at step %d: %s", run.job_id, run.progress.step, reason.value)
    uri = None
    if reason.saves_checkpoint:
        run.report(writer, losses, force=True)
        writer.close()
        uri = run.checkpoint(writer, model, optimizer, classes, f"step-{run.progress.step:09d}.pt", loader)
        run.uploader.drain()
    raise TrainingStopped(reason, run.progress.step, run.runtime_s, uri)
