"""The training loop: spec in; checkpoints and TensorBoard events out to S3.

The standard PyTorch flow, in nanoGPT's order: Dataset/DataLoader → model → loss → Adam
``zero_grad``/``backward``/``step``, validation and checkpoint after each epoch. This module
knows nothing of Celery, FastAPI or Redis: it reports through :class:`TrainingCallbacks`.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from shared.exceptions import JobFailure
from shared.jobs import DatasetInfo, Progress
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.training.checkpoint import save_checkpoint
from worker.training.data import ImageData, load_image_folder
from worker.training.models import build_model

logger = logging.getLogger(__name__)


class TrainingCallbacks:
    """Hooks the engine calls while a job runs; the default does nothing.

    The Celery task subclasses this to write the job record; tests and a CLI can use their own.
    """

    def on_start(self, *, device: str, dataset: DatasetInfo, tensorboard_uri: str) -> None:
        """Data loaded and model built; training is about to begin on ``device``."""

    def on_progress(self, progress: Progress) -> None:
        """Called every ``progress_interval_s`` seconds and after every epoch."""

    def on_checkpoint(self, uri: str) -> None:
        """A checkpoint is complete in S3 at ``uri``."""


@dataclass
class TrainResult:
    """Outcome of a finished job: final metrics and where the final checkpoint is."""

    final_checkpoint: str
    epochs: int
    steps: int
    val_loss: float
    val_accuracy: float


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


class _Run:
    """State and helpers of one training run; :func:`run_training` drives it."""

    def __init__(self, job_id: str, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks):
        self.job_id, self.spec, self.storage, self.settings, self.callbacks = job_id, spec, storage, settings, callbacks
        self.workdir = settings.data_cache_dir / "jobs" / job_id
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.tb_dir = self.workdir / "tensorboard"
        self.tb_uri = storage.job_uri(job_id, "tensorboard")
        self.progress = Progress(epochs=spec.epochs)
        self.metrics: dict[str, float] = {}
        self.started = time.monotonic()
        self.last_progress = self.last_tb_upload = self.started

    def upload_tensorboard(self, writer: SummaryWriter) -> None:
        writer.flush()
        self.storage.upload_dir(self.tb_dir, self.tb_uri)
        self.last_tb_upload = time.monotonic()

    def checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, classes: list[str], name: str) -> str:
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
        )
        uri = self.storage.upload_file(path, self.storage.job_uri(self.job_id, "checkpoints", name))
        path.unlink()
        self.callbacks.on_checkpoint(uri)
        return uri

    def report(self, writer: SummaryWriter, losses: _ScalarBuffer, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < self.settings.progress_interval_s:
            return
        latest = losses.drain(writer, "train/loss")
        if latest is not None:
            self.progress.train_loss = latest
            self.metrics["train_loss"] = latest
        elapsed = max(now - self.started, 1e-9)
        done = self.progress.step
        self.progress.samples_per_s = done * self.spec.batch_size / elapsed if done else None
        self.progress.eta_s = (self.progress.total_steps - done) * elapsed / done if done else None
        self.progress.updated_at = time.time()
        self.callbacks.on_progress(self.progress.model_copy())
        self.last_progress = now
        if now - self.last_tb_upload >= self.settings.tensorboard_upload_interval_s:
            self.upload_tensorboard(writer)


def _loaders(data: ImageData, spec: JobSpec, device: torch.device) -> tuple[DataLoader, DataLoader]:
    common = dict(
        batch_size=spec.batch_size,
        num_workers=spec.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_dataloader_worker,
        persistent_workers=spec.num_workers > 0,
    )
    generator = torch.Generator().manual_seed(spec.seed)
    train = DataLoader(data.train, shuffle=True, generator=generator, **common)
    val = DataLoader(data.val, shuffle=False, **common)
    return train, val


def run_training(
    job_id: str,
    spec: JobSpec,
    storage: Storage,
    settings: Settings,
    callbacks: TrainingCallbacks | None = None,
) -> TrainResult:
    """Train ``spec`` and upload its checkpoints and TensorBoard events under the job's prefix.

    Artifacts: ``<prefix>/<job_id>/tensorboard/`` (uploaded every epoch, every
    ``tensorboard_upload_interval_s`` seconds, and after close even when training fails) and
    ``<prefix>/<job_id>/checkpoints/step-<step>.pt`` every ``spec.checkpoint`` interval, plus
    ``final.pt``.

    Raises:
        JobFailure: a fault of the job (its data, e.g. :class:`shared.exceptions.DatasetError`,
            or its spec). Anything else is an infrastructure or programming error.
    """
    callbacks = callbacks or TrainingCallbacks()
    run = _Run(job_id, spec, storage, settings, callbacks)
    seed_everything(spec.seed)
    device = resolve_device(spec.device)
    data = load_image_folder(spec.dataset, storage, settings.data_cache_dir / "datasets", spec.seed)
    num_classes = spec.model.num_classes or len(data.classes)
    if num_classes != len(data.classes):
        raise JobFailure(
            f"model.num_classes is {num_classes} but {spec.dataset.uri} has {len(data.classes)} classes: {data.classes}"
        )
    model = build_model(spec.model, num_classes=num_classes, in_channels=spec.dataset.channels).to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.loss.label_smoothing)
    opt = spec.optimizer
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    train_loader, val_loader = _loaders(data, spec, device)
    run.progress.steps_per_epoch = len(train_loader)
    run.progress.total_steps = spec.epochs * len(train_loader)
    callbacks.on_start(
        device=describe_device(device),
        dataset=DatasetInfo(classes=data.classes, num_train=len(data.train), num_val=len(data.val)),
        tensorboard_uri=run.tb_uri + "/",
    )
    logger.info("job %s: training on %s, %d steps", job_id, device, run.progress.total_steps)

    writer = SummaryWriter(log_dir=str(run.tb_dir))
    try:
        losses = _ScalarBuffer()
        val_loss = val_accuracy = float("nan")
        model.train()
        for epoch in range(spec.epochs):
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
                every = spec.checkpoint.every_steps
                if every and run.progress.step % every == 0:
                    run.report(writer, losses, force=True)
                    run.checkpoint(model, optimizer, data.classes, f"step-{run.progress.step:09d}.pt")
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
                run.checkpoint(model, optimizer, data.classes, f"step-{step:09d}.pt")
            run.upload_tensorboard(writer)
        final_uri = run.checkpoint(model, optimizer, data.classes, "final.pt")
    except BaseException:
        # The events written so far are still worth having: upload them, but never hide the
        # training error behind an upload error.
        writer.close()
        try:
            storage.upload_dir(run.tb_dir, run.tb_uri)
        except Exception:
            logger.exception("job %s: TensorBoard upload after failure failed", job_id)
        raise
    writer.close()
    storage.upload_dir(run.tb_dir, run.tb_uri)  # the job is not done until its events are in S3
    return TrainResult(
        final_checkpoint=final_uri,
        epochs=spec.epochs,
        steps=run.progress.step,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
    )
