"""What a running job tells: progress (phases, rates, losses, metrics) to its callbacks, scalars to TensorBoard."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from shared.exceptions import JobFailure
from shared.records import JobPhase, Progress
from shared.settings import Settings
from shared.spec import JobSpec
from worker.training.artifacts import ArtifactWriter
from worker.training.contract import TrainingCallbacks
from worker.training.distributed import ProcessGroup
from worker.training.state import TrainState

logger = logging.getLogger(__name__)
#: Seconds between log lines of a phase's file counts (a long download).
PHASE_LOG_INTERVAL_S = 10.0


class ScalarBuffer:
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

class NullWriter:
    """Stands in for the ``SummaryWriter`` on ranks other than 0: only rank 0 writes events."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Reporter:
    """What one rank of a running job tells: progress to the callbacks, scalars to TensorBoard.

    The record's :class:`Progress` is built from the :class:`TrainState` at each report; the
    reporter keeps only what the state does not (the phase and its file counts, the latest
    train loss, the throughput, early stopping). Only rank 0 writes events.
    """

    def __init__(
        self, spec: JobSpec, settings: Settings, callbacks: TrainingCallbacks, group: ProcessGroup,
        state: TrainState, artifacts: ArtifactWriter,
    ) -> None:
        self.spec, self.settings, self.callbacks, self.group = spec, settings, callbacks, group
        self.state, self.artifacts = state, artifacts
        self.progress = Progress(epochs=spec.epochs)  # the fields the state does not hold
        self.writer: SummaryWriter | NullWriter = NullWriter()
        self.losses = ScalarBuffer()
        self.last_progress = self.last_phase_log = time.monotonic()
        # (monotonic time, step) of this attempt's first report after a step: the throughput is
        # measured from there, so the download, checks, model build and first step don't count.
        self.rate_origin: tuple[float, int] | None = None
        self.start_step = 0

    def open_writer(self, resumed: bool) -> None:
        """Start this attempt's TensorBoard events (rank 0) at the state's step.

        purge_step: TensorBoard drops events at or after it from an earlier attempt's files, so a
        resumed job shows each step once (one run per job, however many attempts). An attempt that
        starts from scratch purges everything an earlier one may have uploaded before it died.
        """
        self.start_step = self.state.step
        if self.group.is_main:
            purge_step = self.state.step + 1 if resumed else 0
            self.writer = SummaryWriter(log_dir=str(self.artifacts.tb_dir), purge_step=purge_step)

    def snapshot(self) -> Progress:
        """The progress to report now: the state's counters and metrics beside the reporter's own fields."""
        state = self.state
        # Non-finite values (an r2 of a constant target) are left out of the record: JSON has no NaN.
        shown = {k: v for k, v in state.metrics.items() if math.isfinite(v)}
        return self.progress.model_copy(update={
            "epoch": state.epoch,
            "step": state.step,
            "steps_per_epoch": state.steps_per_epoch,
            "total_steps": self.spec.epochs * state.steps_per_epoch,
            "val_metrics": {k: v for k, v in shown.items() if k.startswith("val_")},
            "val_loss": shown.get("val_loss"),
            "val_accuracy": shown.get("val_accuracy"),
            "train_epoch_loss": shown.get("train_epoch_loss"),
            "runtime_s": state.runtime_s,
            "updated_at": time.time(),
        })

    def set_phase(self, phase: JobPhase) -> None:
        """Record ``phase`` without a report: the next one shows it."""
        self.progress.phase = phase

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
        now = time.monotonic()
        # The job's log says what it does before training too (a first download was 20 s of silence).
        if phase not in (JobPhase.TRAINING, JobPhase.VALIDATING) and (
            phase != self.progress.phase or (files_total and now - self.last_phase_log >= PHASE_LOG_INTERVAL_S)
        ):
            counts = f" {files_done or 0}/{files_total} files" if files_total else ""
            logger.info("job %s: %s%s", self.artifacts.job_id, phase.value.replace("_", " "), counts)
            self.last_phase_log = now
        self.progress.phase = phase
        self.progress.files_done, self.progress.files_total = files_done, files_total
        self.progress.bytes_done, self.progress.bytes_total = bytes_done, bytes_total
        if changed or now - self.last_progress >= self.settings.progress_interval_s:
            self.callbacks.on_progress(self.snapshot())
            self.last_progress = now

    def log_inputs(self, inputs: torch.Tensor) -> None:
        """The job's very first batch of images as a grid (``inputs``: N×C×H×W), once."""
        if self.state.step == 0 and self.state.batch_in_epoch == 0 and inputs.dim() == 4:
            self.writer.add_image("inputs", make_grid(inputs[:64].cpu(), nrow=8, normalize=True), 0)

    def log_step(self, lr: float, loss: torch.Tensor) -> None:
        """The lr the step just taken used and its loss (kept on the device until the next report)."""
        self.writer.add_scalar("train/lr", lr, self.state.step)
        self.losses.add(self.state.step, loss)

    def drain_losses(self) -> None:
        """Copy the buffered train losses off the device (one sync), log them, check them.

        Raises:
            JobFailure: a loss is nan or inf (the job diverged), naming its step and epoch and
                the newest checkpoint with finite weights.
        """
        points = self.losses.drain(self.writer, "train/loss")
        if not points:
            return
        state = self.state
        bad = next(((step, value) for step, value in points if not math.isfinite(value)), None)
        if bad is not None:
            step, value = bad
            raise JobFailure(
                f"loss became {value} at step {step}, epoch {state.epoch_of(step)}; "
                f"last finite checkpoint: {state.last_checkpoint or 'none'} (lower optimizer.lr, or set grad_clip_norm)"
            )
        self.progress.train_loss = state.metrics["train_loss"] = points[-1][1]
        state.epoch_loss_sum += sum(value for _, value in points)
        state.epoch_loss_steps += len(points)

    def end_epoch_loss(self) -> None:
        """Log the mean train loss of the epoch just finished (``train/epoch_loss``) and reset it."""
        self.drain_losses()
        state = self.state
        if state.epoch_loss_steps:
            mean = state.epoch_loss_sum / state.epoch_loss_steps
            state.metrics["train_epoch_loss"] = mean
            self.writer.add_scalar("train/epoch_loss", mean, state.step)
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0

    def log_validation(self, metrics: dict[str, float], early_stopped: bool) -> None:
        """Keep the epoch's validation ``metrics`` in the state and log them at its step."""
        self.state.metrics.update(metrics)
        for name, value in metrics.items():
            self.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, self.state.step)
        self.writer.add_scalar("train/epoch", self.state.epoch, self.state.step)
        self.progress.early_stopped = early_stopped

    def report(self, *, force: bool = False) -> None:
        """Send progress (rank 0), at most every ``progress_interval_s`` unless ``force``; upload the
        TensorBoard events every ``tensorboard_upload_interval_s``."""
        if not self.group.is_main:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < self.settings.progress_interval_s:
            return
        self.drain_losses()
        step = self.state.step
        if self.rate_origin is None and step > self.start_step:
            self.rate_origin = (now, step)
        if self.rate_origin is not None and step > self.rate_origin[1]:
            steps_per_s = (step - self.rate_origin[1]) / max(now - self.rate_origin[0], 1e-9)
            samples_per_step = self.spec.batch_size * self.spec.grad_accumulation_steps
            self.progress.samples_per_s = steps_per_s * samples_per_step
            self.progress.eta_s = (self.spec.epochs * self.state.steps_per_epoch - step) / steps_per_s
        self.callbacks.on_progress(self.snapshot())
        self.last_progress = now
        self.artifacts.upload_tensorboard_if_due(self.writer)
