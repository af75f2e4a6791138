"""The training loop, in nanoGPT's order: one rank's run, its epochs, its steps.

:func:`run_rank` sets a rank up (seed, device, preparation, resume) and calls :func:`train`;
:func:`train_epoch` takes the optimizer steps of one epoch and validates at its end;
:func:`train_step` is one optimizer step over its micro-batches. Resume restores model,
optimizer, epoch/step, RNG states and the DataLoader's position in the epoch (torchdata's
``StatefulDataLoader``), so that on the same hardware a killed and resumed job ends with weights
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import NoReturn

import torch
from torch import nn

from shared.exceptions import Interrupted
from shared.records import DatasetInfo, JobPhase
from shared.settings import Settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.faults import mark_stage
from worker.training.artifacts import ArtifactWriter
from worker.training.checkpoint import CheckpointKind
from worker.training.contract import StopReason, TrainingCallbacks, TrainingStopped, TrainResult
from worker.training.cpu import choose_threads, training_threads
from worker.training.distributed import SINGLE_PROCESS, ProcessGroup
from worker.training.evaluate import evaluate
from worker.training.fastpath import configure_backends, training_module
from worker.training.loaders import stop_loader_workers
from worker.training.memory import memory_budget
from worker.training.parts import RunInfo, Trackers
from worker.training.prepare import describe_device, prepare, resolve_device, seed_everything
from worker.training.reporter import Reporter
from worker.training.state import TrainState
from worker.training.trainer import StopPoll, Trainer, resume

logger = logging.getLogger("worker.training.engine")  # the name the job logs have always shown
# torchdata 0.11's StatefulDataLoader calls a torch API deprecated in newer torch; harmless noise.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

#: Seconds a stopping run (cancel, time limit, shutdown) waits for its last checkpoint's upload.
STOP_UPLOAD_WAIT_S = 60.0


def run_rank(
    job_id: str, spec: JobSpec, storage: Storage, settings: Settings, callbacks: TrainingCallbacks,
    group: ProcessGroup = SINGLE_PROCESS,
) -> TrainResult:
    """One process's part of :func:`~worker.training.engine.run_training` (all of it in a one-process
    job): rank ``group.rank`` of ``group.world_size``, in a process group already initialized."""
    state = TrainState()
    artifacts = ArtifactWriter(job_id, storage, settings, callbacks, group, state, keep_last=spec.checkpoint.keep_last)
    stop = StopPoll(callbacks, group, state, spec.time_limit_s(settings.max_runtime_s))
    with ExitStack() as cleanup:
        cleanup.callback(artifacts.close)
        reporter = Reporter(spec, settings, callbacks, group, state, artifacts)
        # seed, device and threads (while preparing; the job's own count is chosen after the resume)
        seed_everything(spec.seed)
        device = resolve_device(spec.device)
        if device.type == "cuda" and group.distributed:
            device = torch.device("cuda", group.rank)
        configure_backends(spec.performance, device)
        threads = training_threads(spec.num_workers, settings.torch_threads, processes=group.world_size)
        torch.set_num_threads(threads)
        # data, model, loaders: phases shown in the record, stoppable by rank 0
        try:
            prepared = prepare(
                spec, storage, settings, device, budget_bytes=memory_budget(settings, device),
                should_stop=stop.local, on_phase=reporter.show_phase, group=group,
            )
        except Interrupted as stopped:  # cancel, time limit or shutdown before training: nothing to save
            raise TrainingStopped(stopped.reason, state.step, state.runtime_s, None) from None
        cleanup.callback(stop_loader_workers, prepared.loader, prepared.val_loader)
        state.steps_per_epoch = prepared.steps_per_epoch
        if group.rank:
            seed_everything(spec.seed + group.rank)  # own dropout masks per rank (the model is rank 0's)
        # resume, then the threads the whole job trains with, then wrap the model (DDP copies rank 0's weights)
        info, trackers = RunInfo(job_id, spec, prepared, group), Trackers.of(spec)
        resumed_from = resume(job_id, prepared, info, trackers, state, artifacts)
        choose_threads(
            job_id, spec, settings, device, threads,
            resumed_threads=info.resumed_threads, distributed=group.distributed, prepared=prepared,
        )
        train_model = training_module(prepared.model, spec.performance, device, group.distributed)
        trainer = Trainer(job_id, prepared, train_model, trackers, info, state, reporter, artifacts, stop)
        _announce(trainer, device, resumed_from)
        return train(trainer)


def _announce(t: Trainer, device: torch.device, resumed_from: str | None) -> None:
    """Tell the callbacks (rank 0) and the log that training begins; open the TensorBoard events."""
    group, data = t.group, t.prepared.data
    if group.is_main:
        t.stop.callbacks.on_start(
            device=describe_device(device) if not group.distributed else f"{group.world_size} × {describe_device(device)}",
            dataset=DatasetInfo(
                task=data.task, classes=data.classes, num_train=len(data.train), num_val=len(data.val),
                features=data.metadata.get("features"),
            ),
            tensorboard_uri=t.artifacts.tb_uri + "/",
            resumed_from=resumed_from,
        )
    fast = t.prepared.fast
    logger.info(
        "job %s: training on %s in %s%s from step %d of %d", t.job_id, device, fast.precision,
        ", channels_last" if fast.channels_last else "", t.state.step, t.spec.epochs * t.state.steps_per_epoch,
    )
    t.reporter.open_writer(resumed=resumed_from is not None)


def train(t: Trainer) -> TrainResult:
    """The epochs from the state's on, then the final checkpoint; return once every artifact is in S3."""
    state, spec = t.state, t.spec
    t.reporter.show_phase(JobPhase.TRAINING)
    try:
        t.prepared.model.train()
        for epoch in range(state.epoch, spec.epochs):
            if train_epoch(t, epoch):
                break  # early stopping
        t.reporter.writer.close()
        t.reporter.show_phase(JobPhase.UPLOADING)
        final_uri = t.save_checkpoint(CheckpointKind.FINAL)
        t.artifacts.drain()  # the job is not done until its artifacts are in S3
    except TrainingStopped:
        t.reporter.writer.close()
        raise
    except BaseException as exc:
        step = state.step + 1  # the step being taken (unless an inner stage was named)
        mark_stage(exc, f"step {step} (epoch {state.epoch_of(step)})")
        # The events written so far are still worth having; but never hide the training error
        # behind an upload error.
        t.reporter.writer.close()
        try:
            t.artifacts.upload_tensorboard(t.reporter.writer)
            t.artifacts.drain()
        except Exception:
            logger.exception("job %s: TensorBoard upload after failure failed", t.job_id)
        raise
    metrics = state.metrics
    return TrainResult(
        final_checkpoint=final_uri, epochs=state.epoch, steps=state.step,
        val_loss=metrics.get("val_loss", float("nan")), val_accuracy=metrics.get("val_accuracy", float("nan")),
        runtime_s=state.runtime_s, metrics=dict(metrics),
    )


def train_epoch(t: Trainer, epoch: int) -> bool:
    """The optimizer steps of epoch ``epoch`` (0-based) from the state's batch on, then its
    validation; True to stop early."""
    state, spec, loader = t.state, t.spec, t.prepared.loader
    # the epoch's shuffle: a function of (seed, epoch), so a resumed run replays it
    t.prepared.sampler.set_epoch(epoch)
    t.prepared.data.set_epoch(epoch)
    batches, accumulate = len(loader), spec.grad_accumulation_steps
    micro_batches = iter(loader)
    for first in micro_batches:
        group_size = min(accumulate, batches - state.batch_in_epoch)  # the epoch's last group may be short
        train_step(t, itertools.chain([first], itertools.islice(micro_batches, group_size - 1)), group_size)
        # stop poll: the same answer on every rank
        reason = t.stop.shared()
        if reason is not None:
            stop(t, reason)
        # checkpoint on schedule, then timing and logging
        every = spec.checkpoint.every_steps
        if every and state.step % every == 0:
            t.reporter.report(force=True)
            t.save_checkpoint(CheckpointKind.STEP)
        t.reporter.report()
    state.epoch, state.batch_in_epoch = epoch + 1, 0
    return end_epoch(t)


def train_step(t: Trainer, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], group_size: int) -> None:
    """One optimizer step over ``group_size`` micro-batches (``grad_accumulation_steps``, fewer at an epoch's end)."""
    state, spec, fast, optimizer = t.state, t.spec, t.prepared.fast, t.prepared.optimizer
    # forward backward, one micro-batch at a time (DDP all-reduces the gradients with the last one)
    micro_losses = []
    for index, (inputs, targets) in enumerate(micro_batches):  # on the device already (DevicePrefetcher)
        t.reporter.log_inputs(inputs)
        state.batch_in_epoch += 1
        with gradient_sync(t.train_model, stepping=index == group_size - 1):
            with fast.autocast():
                loss = t.prepared.loss_fn(t.train_model(inputs), targets)
            fast.backward(loss / group_size if group_size > 1 else loss)
        micro_losses.append(loss.detach())
    # clip the gradient
    if spec.grad_clip_norm is not None:
        fast.unscale(optimizer)
        nn.utils.clip_grad_norm_(t.prepared.model.parameters(), spec.grad_clip_norm)
    # step the optimizer and the lr schedule, flush the gradients
    fast.step(optimizer)
    lr = optimizer.param_groups[0]["lr"]  # the lr this step used
    if t.prepared.scheduler is not None:
        t.prepared.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # account (the loss stays on the device until the next report)
    state.step += 1
    t.reporter.log_step(lr, torch.stack(micro_losses).mean() if len(micro_losses) > 1 else micro_losses[0])


def gradient_sync(train_model: nn.Module, stepping: bool) -> AbstractContextManager:
    """Context for a micro-batch's forward and backward: DDP's ``no_sync`` when the micro-batch
    does not end its accumulation group (its gradients are all-reduced with the last one's)."""
    ddp = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if stepping or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return ddp.no_sync()


def end_epoch(t: Trainer) -> bool:
    """Validate, log, keep the best checkpoint, checkpoint on schedule; True to stop early.

    With several processes rank 0 validates and shares the metrics, so every rank takes the same
    decisions (best checkpoint, early stop) and joins the same checkpoints.
    """
    state, spec, prepared, group = t.state, t.spec, t.prepared, t.group
    epoch = state.epoch
    t.reporter.end_epoch_loss()  # a diverged epoch fails here, before validation and checkpoints
    t.reporter.show_phase(JobPhase.VALIDATING)
    metrics, stopped = None, None
    if group.is_main:
        try:
            metrics = evaluate(
                prepared.model, prepared.val_loader, prepared.loss_fn, prepared.fast.device, prepared.data.task,
                prepared.fast, should_stop=t.stop.local,
            )
        except Interrupted as stop_:  # the epoch's training is kept: a resumed job starts the next epoch
            stopped = stop_.reason
    metrics, stopped = group.share((metrics, stopped))
    if stopped is not None:
        stop(t, stopped)  # on every rank: they all join the stop checkpoint
    t.reporter.set_phase(JobPhase.TRAINING)
    stop_early = False
    if "early_stopping" in t.trackers:
        tracker = t.trackers["early_stopping"]
        tracker.update(metrics)
        stop_early = tracker.stale_epochs >= spec.early_stopping.patience and epoch < spec.epochs
    t.reporter.log_validation(metrics, early_stopped=stop_early)
    t.reporter.report(force=True)
    if group.is_main:
        logger.info("job %s: epoch %d/%d %s", t.job_id, epoch, spec.epochs, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if "best" in t.trackers and t.trackers["best"].update(metrics):
        t.save_checkpoint(CheckpointKind.BEST)
    if epoch % spec.checkpoint.every_epochs == 0 and epoch < spec.epochs and not stop_early:
        t.save_checkpoint(CheckpointKind.STEP)
    else:
        t.artifacts.upload_tensorboard(t.reporter.writer)
    if stop_early:
        logger.info("job %s: early stopping after epoch %d: %s stopped improving", t.job_id, epoch, spec.early_stopping.metric)
    return stop_early


def stop(t: Trainer, reason: StopReason) -> NoReturn:
    """End the run at this step boundary: checkpoint and upload (unless the lease is lost), raise."""
    state = t.state
    logger.warning("job %s: stopping at step %d: %s", t.job_id, state.step, reason.value)
    uri = None
    if reason.saves_checkpoint:
        t.reporter.report(force=True)
        t.reporter.writer.close()
        # Between epochs (stopped while validating) the DataLoader has no position to keep.
        uri = t.save_checkpoint(CheckpointKind.STEP)
        # Give the checkpoint and events a minute to land; an S3 outage must not hold a cancel.
        if not t.artifacts.drain(stoppable=False, max_wait_s=STOP_UPLOAD_WAIT_S):
            uri = None
    raise TrainingStopped(reason, state.step, state.runtime_s, uri)
