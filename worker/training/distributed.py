"""Multi-GPU jobs: ``resources.gpus: N`` trains with DistributedDataParallel, one process per GPU.

The worker's own process (the Celery task's, which holds the job's lease and heartbeat) becomes a
supervisor: it starts N rank processes with ``torch.multiprocessing``'s ``spawn`` start method
(CUDA cannot be used in a forked child) and relays between them and its
:class:`~worker.training.contract.TrainingCallbacks`:

- rank 0 sends ``on_start``, progress and checkpoint reports and its outcome (result, stop or
  failure) through a queue; the supervisor calls the callbacks and returns or raises the same
  :class:`TrainResult`, :class:`TrainingStopped` or :class:`JobFailure` a one-process run would;
- the supervisor polls ``stop_requested`` (cancel, shutdown, lost lease) and puts the answer in a
  shared value; rank 0 reads it after every optimizer step and broadcasts it, so every rank stops
  at the same step (and joins the stop checkpoint);
- a rank that dies ends the job's attempt: the others are terminated and the error is raised
  (an infrastructure error: the job is retried). Ranks die with the supervisor (``PR_SET_PDEATHSIG``),
  so a killed worker leaves no rank training, or writing, behind.

Only rank 0 writes (checkpoints, TensorBoard) and validates. Data flows as in one process with
the global batch split evenly: ``DistributedSampler(num_replicas=N)`` deals rank ``r`` the
positions ``r, r + N, …`` of the epoch's shuffle, so the union of the ranks' k-th batches is the
one-process run's k-th batch (DDP averages the gradients, so the step is the same up to float
rounding). Control messages (stop flag, metrics, the RNG and loader states gathered into
checkpoints) go over a gloo group on the CPU, so they never wait for the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from shared.exceptions import JobFailure
from shared.settings import Settings
from shared.spec import JobSpec
from worker.training.contract import StopReason, TrainingCallbacks, TrainingStopped, TrainResult


logger = logging.getLogger(__name__)

#: How long a rank waits in a control collective (rank 0 downloading the data, validating,
#: uploading) before giving up. A dead rank is noticed by the supervisor long before.
CONTROL_TIMEOUT = timedelta(hours=6)
#: Seconds the supervisor waits for ranks to exit after the outcome, before terminating them.
EXIT_GRACE_S = 30.0
_POLL_S = 0.1


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a job: ``rank`` of ``world_size``; one process is rank 0 of 1.

    Every method is a collective (all ranks must call it, in the same order) when
    ``world_size > 1``, and returns its argument at once in a one-process run.
    """

    rank: int = 0
    world_size: int = 1
    control: Any = None  # gloo group for CPU-side messages; None: the default group (gloo)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, writes checkpoints and TensorBoard, and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process trains the job."""
        return self.world_size > 1

    def share_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (one small CPU broadcast)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(tensor, src=0, group=self.control)
        return int(tensor.item())

    def share(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.distributed:
            dist.barrier(group=self.control)


SINGLE_PROCESS = ProcessGroup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: What each rank process runs: :func:`worker.training.loop.run_rank` (a module-level function,
#: so that the spawned process can import it by name).
RankMain = Callable[..., TrainResult]


def launch(
    job_id: str, spec: JobSpec, settings: Settings, callbacks: TrainingCallbacks, world_size: int, backend: str,
    run_rank: RankMain,
) -> TrainResult:
    """Train ``spec`` in ``world_size`` spawned processes (``backend``: ``nccl`` or ``gloo``), each
    calling ``run_rank``, and relay their reports to ``callbacks``; return or raise what rank 0 ended with.

    Raises:
        TrainingStopped: as :func:`~worker.training.engine.run_training` (every rank stopped).
        JobFailure: a fault of the job, raised in any rank.
        RuntimeError: a rank failed otherwise or died (an infrastructure error: retried).
    """
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # an earlier job's cached blocks in this process would shrink rank 0's GPU
    context = torch.multiprocessing.get_context("spawn")
    events = context.Queue()
    stop = context.Value("i", 0)  # 0: go on; k: the k-th StopReason
    port = _free_port()
    spec_json = spec.model_dump(mode="json")
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, backend, port, job_id, spec_json, settings, events, stop, run_rank),
            name=f"trainq-{job_id}-rank{rank}",
        )
        for rank in range(world_size)
    ]
    logger.info("job %s: starting %d %s processes", job_id, world_size, backend)
    for process in processes:
        process.start()
    kind, payload = "error", (0, "supervisor interrupted")
    try:
        kind, payload = _supervise(processes, events, stop, callbacks, list(StopReason))
    finally:
        # After a result or a stop the ranks are leaving by themselves (rank 0 may still be
        # uploading); after a failure the others may wait in a collective that never completes.
        _end(processes, EXIT_GRACE_S if kind in ("result", "stopped") else 2.0)
        events.close()
    if kind == "result":
        return payload
    if kind == "stopped":
        reason, step, runtime_s, checkpoint = payload
        raise TrainingStopped(StopReason(reason), step, runtime_s, checkpoint)
    rank, message = payload
    if kind == "job_failure":
        raise JobFailure(message)
    raise RuntimeError(f"rank {rank} of {world_size}: {message}")


def _supervise(processes: list, events: Any, stop: Any, callbacks: TrainingCallbacks, reasons: list) -> tuple[str, Any]:
    """Relay reports until an outcome arrives or a rank dies; return ``(kind, payload)``."""
    while True:
        reason = callbacks.stop_requested()
        if reason is not None and stop.value == 0:
            stop.value = reasons.index(reason) + 1
        try:
            kind, payload = events.get(timeout=_POLL_S)
        except queue.Empty:
            dead = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if not dead and not all(p.exitcode == 0 for p in processes):
                continue
            try:  # a rank's last words may still be in the pipe
                kind, payload = events.get(timeout=1.0)
            except queue.Empty:
                rank, code = dead[0] if dead else (0, 0)
                return "error", (rank, f"process exited with code {code} before the job ended")
        if kind == "start":
            callbacks.on_start(**payload)
        elif kind == "progress":
            callbacks.on_progress(payload)
        elif kind == "checkpoint":
            callbacks.on_checkpoint(*payload)
        elif kind == "checkpoint_deleted":
            callbacks.on_checkpoint_deleted(payload)
        else:
            return kind, payload


def _end(processes: list, grace_s: float) -> None:
    """Let the ranks exit; terminate (then kill) those still running after ``grace_s`` seconds."""
    for process in processes:
        process.join(timeout=grace_s)
    for process in processes:
        if process.is_alive():
            logger.warning("%s still running; terminating it", process.name)
            process.terminate()
            process.join(timeout=5.0)
        if process.is_alive():
            process.kill()
            process.join()


class _RelayCallbacks:
    """Rank 0's callbacks: reports go to the supervisor's queue; the stop flag comes from it."""

    def __init__(self, events: Any, stop: Any) -> None:
        self.events, self.stop, self.reasons = events, stop, list(StopReason)

    def on_start(self, **fields: Any) -> None:
        self.events.put(("start", fields))

    def on_progress(self, progress: Any) -> None:
        self.events.put(("progress", progress))

    def on_checkpoint(self, uri: str, kind: Any) -> None:
        self.events.put(("checkpoint", (uri, kind)))

    def on_checkpoint_deleted(self, uri: str) -> None:
        self.events.put(("checkpoint_deleted", uri))

    def stop_requested(self) -> Any:
        code = self.stop.value  # shared memory: no I/O
        return self.reasons[code - 1] if code else None


def _die_with_parent() -> None:
    # A rank must never train or write on after the worker process died (another worker may
    # own the job by then): the kernel kills it with its parent.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = torch.multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        os._exit(1)


def _rank_main(
    rank: int, world_size: int, backend: str, port: int, job_id: str, spec_json: dict,
    settings: Settings, events: Any, stop: Any, run_rank: RankMain,
) -> None:
    """Entry point of one rank process."""
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    from shared.storage import Storage

    code = 0
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=CONTROL_TIMEOUT
        )
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if backend != "gloo" else None
        group = ProcessGroup(rank, world_size, control)
        callbacks = _RelayCallbacks(events, stop) if rank == 0 else TrainingCallbacks()
        spec = JobSpec.model_validate(spec_json)
        result = run_rank(job_id, spec, Storage(settings), settings, callbacks, group)
        if rank == 0:
            events.put(("result", result))
    except TrainingStopped as stopped:
        if rank == 0:
            events.put(("stopped", (stopped.reason.value, stopped.step, stopped.runtime_s, stopped.checkpoint)))
    except JobFailure as exc:
        events.put(("job_failure", (rank, str(exc))))
    except BaseException as exc:
        logging.getLogger(__name__).exception("job %s: rank %d failed", job_id, rank)
        events.put(("error", (rank, f"{type(exc).__name__}: {exc}")))
        code = 1
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
    sys.exit(code)  # multiprocessing flushes the queue before the process ends
