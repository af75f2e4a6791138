"""Where a digits job's ``runtime_s`` goes: seconds per phase of the engine, against the plain
script's training loop (issue 9, figure 1's second ratio).

Runs ``examples/digits.json`` (lengthened to ``--epochs``) through the training engine in this
process (no Celery: the phases are the engine's) against a local S3 server, once on a cold data
cache and ``--runs`` times warm, and records when ``progress.phase`` changes. Phases:
``setup`` (run start → first phase: clearing the job's scratch folder, access checks),
``downloading`` (listing and fetching, or finding the cache), ``verifying``, ``building_model``
(model, memory estimate, loaders, looking for a checkpoint to resume, the thread probe),
``start`` (TensorBoard writer), ``training`` and ``validating`` (summed over epochs; training includes checkpoint saves),
``uploading`` (the final checkpoint and events, until all are in S3).

    .venv/bin/python -m bench.phases --epochs 20 --runs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import BENCH_ENV, Table, describe_machine
from bench.end_to_end import run_plain_script
from shared.records import Progress
from shared.spec import JobSpec
from shared.storage import Storage
from tests.fixtures import DIGITS_URI, example_spec
from trainq.sample_data import write_digits
from trainq.stack import LocalStack
from worker.training import TrainingCallbacks, run_training


class PhaseClock(TrainingCallbacks):
    """Seconds spent in each ``progress.phase``, from the run's start to the end of its uploads."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.phase, self.since = "setup", self.started
        self.seconds: dict[str, float] = defaultdict(float)

    def _enter(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[self.phase] += now - self.since
        self.phase, self.since = phase, now

    def on_progress(self, progress: Progress) -> None:
        phase = getattr(progress.phase, "value", progress.phase)
        if phase != self.phase:
            self._enter(phase)

    def on_start(self, **kwargs) -> None:
        self._enter("start")  # resumed (or not), threads chosen; the TensorBoard writer is next

    def finish(self) -> dict[str, float]:
        self._enter("done")
        return dict(self.seconds)


def run_once(spec: JobSpec, stack: LocalStack, cache: Path, job_id: str) -> tuple[dict[str, float], float]:
    """Phase seconds and ``runtime_s`` of one job."""
    clock = PhaseClock()
    settings = stack.settings.model_copy(update={"data_cache_dir": cache})
    result = run_training(job_id, spec, Storage(settings), settings, clock)
    return clock.finish(), result.runtime_s


PHASES = ["setup", "downloading", "verifying", "building_model", "start", "training", "validating", "uploading"]


def bench(epochs: int, runs: int, workdir: Path, persistent_workers: bool = False) -> Table:
    """One cold and ``runs`` warm digits jobs, phase by phase, ÷ the script's loop (``OMP_NUM_THREADS=1``)."""
    raw = example_spec() | {"epochs": epochs}
    raw["performance"] = raw.get("performance", {}) | {"persistent_workers": persistent_workers}
    spec = JobSpec.model_validate(raw)
    write_digits(workdir / "digits")
    rows = []
    with LocalStack(workdir / "stack", workers=0, isolated=True, env=BENCH_ENV) as stack:
        Storage(stack.settings).upload_dir(workdir / "digits", DIGITS_URI)
        for run in range(runs + 1):
            phases, runtime = run_once(spec, stack, workdir / "cache", f"phases-{run}")
            rows.append(("cold cache" if run == 0 else f"warm cache {run}", phases, runtime, os.getloadavg()[0]))
            print(rows[-1][0], {name: round(phases.get(name, 0.0), 2) for name in PHASES}, f"runtime_s {runtime:.2f}", flush=True)
    _, script = run_plain_script(workdir / "digits", epochs, threads=1)
    table = Table(f"Where a digits job's runtime_s goes ({epochs} epochs, engine in-process) ÷ the script's training loop")
    loop = script["train_s"]
    for label, phases, runtime, load in rows:
        in_loop = phases.get("training", 0.0) + phases.get("validating", 0.0)
        table.add(f"{label}: runtime_s (every phase)", f"{runtime:.1f} s", f"{loop:.1f} s", runtime / loop, "≤ 1.05", runtime / loop <= 1.05)
        table.add(f"{label}: training loop only (training + validating phases)", f"{in_loop:.1f} s", f"{loop:.1f} s",
                  in_loop / loop, "", None)
        table.notes.append(
            f"{label}, load {load:.2f}: " + ", ".join(f"{name} {phases.get(name, 0.0):.2f} s" for name in PHASES)
        )
    table.notes.append(
        f"script (OMP_NUM_THREADS=1): training loop {loop:.2f} s, of which validation {script['val_s']:.2f} s; "
        f"load {os.getloadavg()[0]:.2f}. The script's loop excludes what a job also does: listing and fetching "
        "the data (downloading), decoding every image once (verifying), the thread probe (building_model), "
        "uploading the final artifacts."
    )
    return table


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2, help="warm-cache jobs after the cold one")
    parser.add_argument("--persistent-workers", action="store_true", help="the spec's performance.persistent_workers")
    args = parser.parse_args()
    print(f"Machine: {describe_machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(bench(args.epochs, args.runs, Path(tmp), args.persistent_workers).markdown())


if __name__ == "__main__":
    main()
