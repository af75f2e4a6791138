"""One rank's attempt at a job: its parts, its state, when it stops, and its checkpoints.

:mod:`worker.training.loop` drives a :class:`Trainer`; this module holds what the loop asks of it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from shared.exceptions import JobFailure
from shared.spec import JobSpec
from worker.faults import in_stage
from worker.training.artifacts import ArtifactWriter
from worker.training.checkpoint import CheckpointKind, Snapshot, capture, capture_rng_state, restore
from worker.training.contract import StopReason, TrainingCallbacks
from worker.training.distributed import ProcessGroup
from worker.training.parts import RankStates, RunInfo, Trackers, checkpoint_parts
from worker.training.prepare import Prepared
from worker.training.reporter import Reporter
from worker.training.state import TrainState

logger = logging.getLogger("worker.training.engine")  # the name the job logs have always shown


@dataclass
class StopPoll:
    """Asks whether to stop: rank 0's callbacks (cancel, shutdown, lost lease) and the time limit."""

    callbacks: TrainingCallbacks
    group: ProcessGroup
    state: TrainState
    max_runtime_s: float

    def local(self) -> StopReason | None:
        """Rank 0's answer (cancel, shutdown, lost lease, time limit); None on the other ranks.

        Not a collective: what rank 0 alone asks while the others wait (data preparation, validation).
        """
        if not self.group.is_main:
            return None
        reason = self.callbacks.stop_requested()
        if reason is None and self.state.runtime_s >= self.max_runtime_s:
            reason = StopReason.TIME_LIMIT
        return reason

    def shared(self) -> StopReason | None:
        """Rank 0's answer, the same on every rank (a collective when several processes train)."""
        reason = self.local()
        if not self.group.distributed:
            return reason
        reasons = list(StopReason)
        code = self.group.share_int(0 if reason is None else reasons.index(reason) + 1)
        return reasons[code - 1] if code else None


@dataclass
class Trainer:
    """What the loop works with: the prepared parts, the wrapped model it calls, the state and its outlets."""

    # swappable training components
    job_id: str
    prepared: Prepared
    train_model: nn.Module  # what the loop calls: DDP- and/or compile-wrapped prepared.model
    trackers: Trackers
    info: RunInfo
    # training state and where it goes
    state: TrainState
    reporter: Reporter
    artifacts: ArtifactWriter
    stop: StopPoll

    @property
    def spec(self) -> JobSpec:
        return self.info.spec

    @property
    def group(self) -> ProcessGroup:
        return self.stop.group

    @in_stage("checkpoint")
    def save_checkpoint(self, kind: CheckpointKind) -> str | None:
        """Snapshot a checkpoint of ``kind`` at this step boundary and queue its write and upload;
        return the URI it will have.

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
        drops only what came after). Mid-epoch the DataLoader's position is saved too.
        With several processes every rank calls this: rank 0 gathers the others' RNG states and
        loader positions into its checkpoint and writes it; the others return None.

        Raises:
            JobFailure: the weights are nan or inf.
            UploadError: an earlier upload (or checkpoint write) has failed.
        """
        self.artifacts.raise_if_failed()  # no use training on when nothing more can be saved
        state, loader = self.state, self.prepared.loader
        own = {"loader": loader.state_dict() if state.batch_in_epoch > 0 else None, "rng": capture_rng_state()}
        gathered = self.group.gather(own)
        if not self.group.is_main:
            return None
        self.artifacts.upload_tensorboard(self.reporter.writer)
        if not weights_finite(self.prepared.model):
            raise JobFailure(
                f"the weights became nan or inf by step {state.step}, epoch {state.epoch_of(state.step)}; "
                f"last finite checkpoint: {state.last_checkpoint or 'none'}"
            )
        parts = checkpoint_parts(self.info, self.prepared, self.trackers, RankStates(self.group, loader, gathered), state)
        uri = self.artifacts.write_checkpoint(kind, Snapshot(capture(parts)))
        state.last_checkpoint = uri
        return uri


def weights_finite(model: nn.Module) -> bool:
    """True if every floating-point parameter and buffer of ``model`` is finite (one sync)."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())


@in_stage("resume")
def resume(job_id: str, prepared: Prepared, info: RunInfo, trackers: Trackers, state: TrainState, artifacts: ArtifactWriter) -> str | None:
    """Restore the newest loadable checkpoint of this job, if any, into the parts; return its URI.

    Rank 0 first aborts the multipart uploads an earlier attempt left open.

    Raises:
        CheckpointError: the newest loadable checkpoint is of another format, its keys do not
            match the parts', or its classes or process count are not this run's.
    """
    group = info.group
    if group.is_main:
        artifacts.abort_earlier_uploads()
    for uri, payload in artifacts.checkpoints():
        restore(payload, checkpoint_parts(info, prepared, trackers, RankStates(group, prepared.loader), state), source=uri)
        state.last_checkpoint = uri
        logger.info("job %s: resuming from %s (epoch %d, step %d)", job_id, uri, state.epoch, state.step)
        return uri
    return None
