"""What callers of the training engine see: its callbacks, its outcome and how it stops early.

Celery's task (:mod:`worker.tasks`), the bench, tests and the dry run use these; nothing here
knows how training works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from shared.records import DatasetInfo, Progress
from worker.training.checkpoint import CheckpointKind


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

    def on_checkpoint(self, uri: str, kind: CheckpointKind) -> None:
        """A checkpoint of ``kind`` (step, best or final) is complete in S3 at ``uri``."""

    def on_checkpoint_deleted(self, uri: str) -> None:
        """An older step checkpoint was deleted from S3 (``checkpoint.keep_last``); called from the upload thread."""

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
