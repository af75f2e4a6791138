"""The stateful parts of a job's checkpoint beyond model, optimizer, scheduler and scaler.

:func:`checkpoint_parts` is the registry :func:`worker.training.checkpoint.capture` and
:func:`~worker.training.checkpoint.restore` work on: the one list of what a checkpoint holds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from shared.exceptions import JobFailure
from shared.spec import JobSpec
from worker.training.checkpoint import Parts, Spread, restore_rng_state
from worker.training.distributed import ProcessGroup
from worker.training.prepare import Prepared
from worker.training.recipe import MetricTracker
from worker.training.state import TrainState


class RunInfo:
    """What the job is: its id, spec, classes, data metadata, processes and torch threads.

    Restoring checks that the data's classes and the process count are the checkpoint's, and
    keeps the torch threads it was trained with (``resumed_threads``).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("job_id", "spec", "classes", "data", "world_size", "torch_threads", "torch_version")

    def __init__(self, job_id: str, spec: JobSpec, prepared: Prepared, group: ProcessGroup) -> None:
        self.job_id, self.spec, self.prepared, self.group = job_id, spec, prepared, group
        self.resumed_threads: int | None = None

    def state_dict(self) -> dict[str, Any]:
        data = self.prepared.data
        return {
            "job_id": self.job_id,
            "spec": self.spec.model_dump(mode="json"),
            "classes": list(data.classes),
            "data": data.metadata,
            "world_size": self.group.world_size,
            "torch_threads": torch.get_num_threads(),  # a resume trains with the same (bit-identical results)
            "torch_version": str(torch.__version__),  # TorchVersion is not weights_only-safe
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises: JobFailure: the dataset's classes or the process count differ from the checkpoint's."""
        classes = self.prepared.data.classes
        if state["classes"] != classes:
            raise JobFailure(f"{self.spec.dataset.uri} now has classes {classes}, the checkpoint was trained on {state['classes']}")
        if state["world_size"] != self.group.world_size:
            raise JobFailure(
                f"the checkpoint was written by {state['world_size']} training process(es) (resources.gpus); "
                f"this run has {self.group.world_size}"
            )
        self.resumed_threads = state["torch_threads"]


class RankStates:
    """Each rank's RNG states and training-loader position: rank 0's at the payload's top level
    (``loader``, ``rng``), the others' in ``rank_states``. ``loader`` is None at an epoch boundary."""

    KEYS: ClassVar[tuple[str, ...]] = ("loader", "rng", "rank_states")

    def __init__(self, group: ProcessGroup, loader: StatefulDataLoader, gathered: list[dict[str, Any]] | None = None) -> None:
        self.group, self.loader, self.gathered = group, loader, gathered

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's view: ``gathered`` holds every rank's ``{"loader", "rng"}``, rank 0's first."""
        own, others = self.gathered[0], self.gathered[1:]
        return {"loader": own["loader"], "rng": own["rng"], "rank_states": others}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = state if self.group.is_main else state["rank_states"][self.group.rank - 1]
        if own["loader"] is not None:
            self.loader.load_state_dict(own["loader"])
        restore_rng_state(own["rng"])


class Trackers(dict[str, MetricTracker]):
    """The job's metric trackers by use (``best``, ``early_stopping``), saved by name."""

    @classmethod
    def of(cls, spec: JobSpec) -> Trackers:
        """The trackers ``spec`` asks for: the best checkpoint's metric, early stopping's."""
        trackers = cls()
        if spec.checkpoint.best_metric is not None:
            trackers["best"] = MetricTracker(spec.checkpoint.best_metric)
        if spec.early_stopping is not None:
            trackers["early_stopping"] = MetricTracker(spec.early_stopping.metric, spec.early_stopping.min_delta)
        return trackers

    def state_dict(self) -> dict[str, Any]:
        return {name: tracker.state_dict() for name, tracker in self.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, tracker in self.items():
            tracker.load_state_dict(state[name])


class NoState:
    """A part that is absent (a job without an lr schedule): saved as None."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: None) -> None:
        pass


def checkpoint_parts(
    info: RunInfo, prepared: Prepared, trackers: Trackers, ranks: RankStates, state: TrainState
) -> Parts:
    """Every part of the job's checkpoint, in the order a resume restores them (the run's
    identity first: a dataset with other classes fails before the model's shapes do)."""
    return {
        "run": Spread(info),
        "model": prepared.model,  # the plain module, never the DDP- or compile-wrapped one
        "optimizer": prepared.optimizer,
        "scaler": prepared.fast,
        "scheduler": prepared.scheduler if prepared.scheduler is not None else NoState(),
        "trackers": trackers,
        "ranks": Spread(ranks),
        "train": Spread(state),
    }
