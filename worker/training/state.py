"""Where training is: the one state object the loop counts in and a checkpoint restores.

The job record's :class:`~shared.records.Progress` is an output built from it
(:mod:`worker.training.reporter`), not the loop's counter.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class TrainState:
    """Counters, losses and metrics of a job over all its attempts; ``Stateful`` for checkpoints.

    Its checkpoint entries stand at the payload's top level (``KEYS``:
    :class:`worker.training.checkpoint.Spread`).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("epoch", "step", "batch_in_epoch", "metrics", "runtime_s", "epoch_loss")

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    epoch_loss_sum: float = 0.0  # this epoch's drained train losses: their sum …
    epoch_loss_steps: int = 0  # … and count
    metrics: dict[str, float] = field(default_factory=dict)  # latest val_*, train_loss, train_epoch_loss
    runtime_before_s: float = 0.0  # training seconds of earlier attempts
    steps_per_epoch: int = 0  # set once the loaders exist; not saved (a function of spec and data)
    last_checkpoint: str | None = None  # newest checkpoint (saved or resumed from): finite weights
    started: float = field(default_factory=time.monotonic)  # this attempt's start (monotonic)

    @property
    def runtime_s(self) -> float:
        """Training seconds so far, this attempt and earlier ones: the time limit's clock."""
        return self.runtime_before_s + time.monotonic() - self.started

    def epoch_of(self, step: int) -> int:
        """The epoch (1-based) that optimizer step ``step`` (1-based) belongs to."""
        return max(1, math.ceil(step / max(self.steps_per_epoch, 1)))

    def state_dict(self) -> dict[str, Any]:
        """The saved counters (plain ints and floats); ``runtime_s`` is read now."""
        return {
            "epoch": int(self.epoch),
            "step": int(self.step),
            "batch_in_epoch": self.batch_in_epoch,
            "metrics": {name: float(value) for name, value in self.metrics.items()},
            "runtime_s": float(self.runtime_s),
            "epoch_loss": [self.epoch_loss_sum, self.epoch_loss_steps],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`: the resumed attempt's clock starts from the saved runtime."""
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.metrics = dict(state["metrics"])
        self.runtime_before_s = state["runtime_s"]
        self.epoch_loss_sum, self.epoch_loss_steps = state["epoch_loss"]
