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

from bench.common import BENCH_ENV, describe_machine
from bench.end_to_end import run_plain_script
from shared.jobs import Progress
from shared.spec import JobSpec
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
        if progress.phase != self.phase:
            self._enter(progress.phase)

    def on_start(self, **kwargs) -> None:
        self._enter("start")  # resumed (or not), threads chosen; the TensorBoard writer is next

    def finish(self) -> dict[str, float]:
        self._enter("done")
        return dict(self.seconds)


def run_once(spec: JobSpec, stack: LocalStack, cache: Path, job_id: str) -> tuple[dict[str, float], float]:
    """Phase seconds and ``runtime_s`` of one job."""
    from shared.storage import Storage

    clock = PhaseClock()
    settings = stack.settings.model_copy(update={"data_cache_dir": cache})
    result = run_training(job_id, spec, Storage(settings), settings, clock)
    return clock.finish(), result.runtime_s


def main() -> None:
    """Print per-phase seconds of a cold and ``--runs`` warm jobs, and the script's loop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2, help="warm-cache jobs after the cold one")
    parser.add_argument("--persistent-workers", action="store_true", help="the spec's performance.persistent_workers")
    args = parser.parse_args()
    print(f"Machine: {describe_machine()}", flush=True)
    raw = example_spec() | {"epochs": args.epochs}
    raw["performance"] = raw.get("performance", {}) | {"persistent_workers": args.persistent_workers}
    spec = JobSpec.model_validate(raw)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_digits(root / "digits")
        rows = []
        with LocalStack(root / "stack", workers=0, isolated=True, env=BENCH_ENV) as stack:
            from shared.storage import Storage

            Storage(stack.settings).upload_dir(root / "digits", DIGITS_URI)
            for run in range(args.runs + 1):
                phases, runtime = run_once(spec, stack, root / "cache", f"phases-{run}")
                rows.append(("cold" if run == 0 else f"warm {run}", phases, runtime, os.getloadavg()[0]))
                print(rows[-1], flush=True)
        _, tuned = run_plain_script(root / "digits", args.epochs, threads=1)
    names = ["setup", "downloading", "verifying", "building_model", "start", "training", "validating", "uploading"]
    print("| run | " + " | ".join(names) + " | runtime_s | load |")
    print("|---|" + "---|" * (len(names) + 2))
    for label, phases, runtime, load in rows:
        print(f"| {label} | " + " | ".join(f"{phases.get(name, 0.0):.2f}" for name in names) + f" | {runtime:.2f} | {load:.2f} |")
    print(f"script (OMP_NUM_THREADS=1) training loop: {tuned['train_s']:.2f} s (validation {tuned['val_s']:.2f} s), "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
