"""How many CPU threads a job's training process should use.

torch's default intra-op pool has one thread per core of the *machine*. In a container limited by
a CFS quota, beside DataLoader worker processes that each want a core, that oversubscribes the CPU:
on a 2-core machine the digits job ran ~1.8× slower with torch's default than with one thread
(issue 9; ``bench/README.md``). But reserving a core per DataLoader worker halves a compute-bound
job on the same machine (photos at 64 px: 94 samples/s at 1 thread, 189 at 2) while its workers
idle. So the worker picks the thread count itself, once per job: ``TORCH_THREADS`` if set; else
the count recorded in the checkpoint a job resumes from (CPU kernels round differently at
different thread counts, and resume must stay bit-identical); else, for a one-process CPU job
with DataLoader workers, :func:`probe_threads` measures one batch's loading and a training step
before step 1 and :func:`decide_threads` gives the workers' cores to torch when the workers
would be mostly idle; else the CPUs this process may use minus the DataLoader workers (at least 1).

The probe times the machine as it is, busy or not: beside a CPU hog it can choose otherwise, and
the same spec would train with another count and end with other weights (issue 19). So its
choice is recorded once per (spec, machine) on the worker (:func:`recorded_threads`) and every
later run of that spec there trains with it: the same spec and seed give the same weights,
whatever the load.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.settings import Settings
from shared.spec import JobSpec
from worker.training.checkpoint import capture_rng_state, restore_rng_state
from worker.training.prepare import Prepared
from worker.training.recipe import build_optimizer

logger = logging.getLogger(__name__)
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup's CFS quota (e.g. 2.5 for ``250000 100000``), or None if unlimited."""
    try:
        if _CGROUP_CPU_MAX.exists():
            quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists():
            quota = int(_CGROUP_V1_QUOTA.read_text())
            return None if quota <= 0 else quota / int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, Kubernetes cpusets), capped by
    the cgroup CPU quota (Docker ``--cpus``, Kubernetes ``limits.cpu``) rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def training_threads(num_workers: int, configured: int = 0, processes: int = 1) -> int:
    """Intra-op threads of each training process of a job with ``num_workers`` DataLoader
    processes per training process.

    Args:
        num_workers: the spec's ``num_workers``; each such process is given a core of its own.
        configured: the ``TORCH_THREADS`` setting; 0 means choose.
        processes: training processes sharing the CPUs (``resources.gpus`` of a multi-GPU job).

    Returns:
        ``configured`` when positive, else ``max(1, (usable_cpus() - processes * num_workers) // processes)``.
    """
    if configured > 0:
        return configured
    return max(1, (usable_cpus() - processes * num_workers) // processes)


#: How much faster (predicted step time) sharing every CPU must be before the probe gives the
#: DataLoader workers' cores to torch: a close call keeps the reserve, so timing noise cannot flip it.
SHARE_MARGIN = 0.9
#: The workers count as mostly idle when one batch costs them at most this fraction of a
#: training step's wall time at the reserved thread count.
IDLE_DATA_FRACTION = 0.25


@dataclass(frozen=True)
class ThreadChoice:
    """What :func:`probe_threads` measured and chose.

    Attributes:
        threads: intra-op threads the job trains with.
        reserve: ``usable CPUs − num_workers`` (at least 1): a core per DataLoader worker.
        share: every usable CPU.
        data_s: CPU seconds to load and transform one batch, in one thread (what a DataLoader
            worker spends per batch).
        step_s: wall seconds of one training step (forward, backward, optimizer step) at
            ``reserve`` and at ``share`` threads, the fastest of the tries.
        probe_s: wall seconds the probe took.
    """

    threads: int
    reserve: int
    share: int
    data_s: float
    step_s: dict[int, float]
    probe_s: float

    def describe(self) -> str:
        """One line for the job's log."""
        steps = ", ".join(f"{threads} thread(s) {seconds * 1000:.1f} ms" for threads, seconds in sorted(self.step_s.items()))
        return f"a batch costs a DataLoader worker {self.data_s * 1000:.1f} ms; a step takes {steps} (probed in {self.probe_s:.2f} s)"


def decide_threads(reserve: int, share: int, num_workers: int, data_s: float, step_s: dict[int, float]) -> int:
    """``share`` when the DataLoader workers would be mostly idle and sharing their cores is clearly faster, else ``reserve``.

    A model of one training step (seconds), from the probe's measurements:

    - reserving a core per worker: ``max(step_s[reserve], data_s / num_workers)`` (the workers
      load the next batches in parallel on their own cores; the loop waits if they are slower);
    - sharing every core: ``step_s[share] + data_s``. The pessimistic bound: a worker that runs
      takes a core from one of torch's threads, and a parallel region waits for its slowest
      thread, so the workers' CPU time adds to the step instead of overlapping it.

    ``share`` is chosen only if ``data_s <= IDLE_DATA_FRACTION * step_s[reserve]`` (the workers
    are idle most of the time) and its step is at most ``SHARE_MARGIN`` of the reserved one.
    Measured on 2 cores with 2 workers (``bench/README.md``): photos at 64 px, data 45 ms,
    steps 340 ms (1 thread) and 170 ms (2) → 2 threads; digits at 8 px, data 5.4 ms, steps 5.6 ms
    and 5.1 ms → 1 thread.
    """
    if share <= reserve or num_workers == 0 or share not in step_s:
        return reserve
    reserved_step = max(step_s[reserve], data_s / num_workers)
    shared_step = step_s[share] + data_s
    if data_s <= IDLE_DATA_FRACTION * step_s[reserve] and shared_step <= SHARE_MARGIN * reserved_step:
        return share
    return reserve


def probe_threads(
    *,
    num_workers: int,
    batch_size: int,
    load_sample: Callable[[int], Any],
    num_samples: int,
    train_step: Callable[[list[Any]], None],
    max_samples: int = 64,
    budget_s: float = 2.0,
) -> ThreadChoice:
    """Measure a job's data and compute costs before its first step and choose its torch threads.

    Loads up to ``max_samples`` samples in this process with one intra-op thread (as a
    DataLoader worker does), twice, and scales the faster pass to ``batch_size``; then runs
    ``train_step`` on them twice at ``reserve`` threads. If loading costs more than
    ``IDLE_DATA_FRACTION`` of that step the workers are busy and the probe stops there (a data-bound
    job pays a few milliseconds); else it runs ``train_step`` twice at ``share`` threads (a third
    time at each count unless the probe has taken ``budget_s`` seconds). The fastest try at each
    count counts (the first includes warm-up). The caller makes ``train_step`` free of side
    effects on the job (a copy of the model and optimizer, RNG states put back) and sets the
    thread count it needs afterwards.

    Args:
        num_workers: the spec's DataLoader workers.
        batch_size: samples per training step.
        load_sample: ``dataset[i]`` of the training set, ``0 <= i < num_samples``.
        train_step: one forward, backward and optimizer step on a batch built from the samples.

    Returns:
        The choice (:func:`decide_threads`) and what it was based on (``step_s`` has only
        ``reserve`` when the probe stopped early).
    """
    reserve, share = training_threads(num_workers), usable_cpus()  # a core per worker / every core
    count = max(1, min(batch_size, max_samples, num_samples))
    started = time.perf_counter()
    torch.set_num_threads(1)
    data_s, samples = math.inf, []
    for _ in range(2):
        began = time.perf_counter()
        samples = [load_sample(i) for i in range(count)]
        data_s = min(data_s, (time.perf_counter() - began) * batch_size / count)
    step_s: dict[int, float] = {}

    def time_step(threads: int) -> None:
        torch.set_num_threads(threads)
        began = time.perf_counter()
        train_step(samples)
        step_s[threads] = min(step_s.get(threads, math.inf), time.perf_counter() - began)

    for _ in range(2):
        time_step(reserve)
    if data_s > IDLE_DATA_FRACTION * step_s[reserve]:  # the workers are busy: keep their cores
        return ThreadChoice(reserve, reserve, share, data_s, step_s, time.perf_counter() - started)
    for _ in range(2):
        time_step(share)
    if time.perf_counter() - started <= budget_s:
        time_step(reserve)
        time_step(share)
    threads = decide_threads(reserve, share, num_workers, data_s, step_s)
    return ThreadChoice(threads, reserve, share, data_s, step_s, time.perf_counter() - started)


def choose_threads(
    job_id: str, spec: JobSpec, settings: Settings, device: torch.device, static: int, *,
    resumed_threads: int | None, distributed: bool, prepared: Prepared,
) -> int:
    """Set and return the torch threads of the whole job (every attempt), after its resume.

    ``TORCH_THREADS`` wins; else the count the resumed checkpoint was trained with (CPU kernels
    give different floating-point results at different thread counts, so a resume with another
    count would not be bit-identical), if this worker has that many CPUs; else, on a fresh
    one-process CPU job whose DataLoader workers hold cores torch could use, the probe's choice
    (:func:`probe_threads`), made once per spec and machine and recorded in
    ``DATA_CACHE_DIR/threads`` (:func:`recorded_threads`); else ``static`` (usable CPUs − workers).
    """
    threads = static
    if settings.torch_threads:
        pass
    elif resumed_threads is not None:
        if resumed_threads <= usable_cpus():
            threads = resumed_threads
        else:
            logger.warning("job %s: resumed from a run with %d torch threads; this worker has %d CPUs, so %d (not bit-identical)",
                           job_id, resumed_threads, usable_cpus(), static)
    elif device.type == "cpu" and not distributed and spec.num_workers and usable_cpus() > static:
        def probe() -> ThreadChoice:
            rng = capture_rng_state()  # dropout and any unseeded transform in the probe draw from these
            try:
                return probe_threads(
                    num_workers=spec.num_workers, batch_size=spec.batch_size, load_sample=prepared.data.train.__getitem__,
                    num_samples=len(prepared.data.train), train_step=_probe_step(prepared, spec),
                )
            finally:
                restore_rng_state(rng)

        # Probed once per spec and machine, then reused: a probe beside a busy CPU must not change the weights.
        threads, choice = recorded_threads(settings.data_cache_dir / "threads", threads_key(spec), probe)
        logger.info("job %s: %s: %d torch thread(s)", job_id, choice.describe() if choice else "as recorded for this spec", threads)
    torch.set_num_threads(threads)
    logger.info("job %s: %d torch thread(s) beside %d DataLoader worker(s)", job_id, threads, spec.num_workers)
    return threads


def _probe_step(prepared: Prepared, spec: JobSpec) -> Callable[[list[Any]], None]:
    """A training step for the thread probe that leaves the job as it was: a copy of the model, an
    optimizer of its own, every RNG state put back. The samples are collated once and repeated
    to a full ``batch_size``."""
    model = copy.deepcopy(prepared.model).train()
    optimizer = build_optimizer(spec, model.parameters())
    batch: list[torch.Tensor] = []

    def step(samples: list[Any]) -> None:
        if not batch:
            inputs, targets = prepared.fast.to_device(*prepared.data.collate(samples))  # decoded here with dataset.decode: device
            repeats = math.ceil(spec.batch_size / len(samples))
            batch.extend((torch.cat([inputs] * repeats)[: spec.batch_size], torch.cat([targets] * repeats)[: spec.batch_size]))
        with prepared.fast.autocast():
            loss = prepared.loss_fn(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


#: Spec fields that do not change what one training step computes or costs: runs that differ only
#: in them share a recorded thread count.
_NOT_IN_STEP = ("name", "seed", "epochs", "max_runtime_s", "checkpoint", "early_stopping", "queue")


def threads_key(spec: JobSpec) -> str:
    """A name for ``spec`` on this machine: a hash of the spec's fields that shape a
    training step, the usable CPUs, the CPU model and capability, and the torch version."""
    fields = {k: v for k, v in spec.model_dump(mode="json").items() if k not in _NOT_IN_STEP}
    machine = {
        "cpus": usable_cpus(), "cpu": _cpu_model(), "arch": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps([fields, machine], sort_keys=True).encode()).hexdigest()[:32]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def recorded_threads(folder: Path, key: str, probe: Callable[[], ThreadChoice]) -> tuple[int, ThreadChoice | None]:
    """The thread count recorded under ``folder`` for ``key``; else ``probe()``'s, recorded first.

    Returns ``(threads, choice)``: ``choice`` is None when the count was recorded before. The
    record is created atomically (a hard link, refused if one exists): of two runs probing at
    once, both train with the count that was recorded first.
    """
    path = folder / f"{key}.json"
    recorded = _read_threads(path)
    if recorded is not None:
        return recorded, None
    choice = probe()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"threads": choice.threads, "probe": choice.describe()}))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    recorded = _read_threads(path)
    return (recorded, choice) if recorded is not None else (choice.threads, choice)


def _read_threads(path: Path) -> int | None:
    try:
        threads = json.loads(path.read_text())["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return threads if isinstance(threads, int) and threads >= 1 else None
