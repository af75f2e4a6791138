"""Shared helpers of the benchmark suite: the machine's description and the results table.

Every figure is a ratio against a baseline measured in the same run, because these machines are
noisy: absolute seconds from two runs are not comparable, a ratio from one run mostly is.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"
#: Every bench stack's environment: the per-owner quotas (60 submissions a minute by default) are
#: out of the way, since a bench submits hundreds of jobs as one owner.
BENCH_ENV = {"SUBMISSIONS_PER_MINUTE": "100000000", "MAX_ACTIVE_JOBS_PER_OWNER": "100000000"}


def describe_machine() -> str:
    """One line: cores (and usable ones), load average, Python, torch and the device."""
    import torch

    from worker.training.cpu import usable_cpus

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({usable_cpus()} usable), load {load}, {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, device {device}"
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear interpolation (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


@dataclass
class Table:
    """Rows of ``(figure, trainq, baseline, ratio, goal, met)`` written as one markdown section."""

    title: str
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, trainq: str, baseline: str, ratio: float | None, goal: str, met: bool | None) -> None:
        """One figure; ``ratio`` is trainq ÷ baseline (or as the goal states)."""
        verdict = "" if met is None else ("met" if met else "**missed**")
        self.rows.append((figure, trainq, baseline, "" if ratio is None else f"{ratio:.2f}", goal, verdict))
        print(f"{self.title}: {figure}: trainq {trainq}, baseline {baseline}, ratio {ratio if ratio is None else round(ratio, 3)} ({goal}) {verdict}", flush=True)

    def markdown(self) -> str:
        """The section: a heading, the table, then the notes."""
        lines = [f"### {self.title}", "", "| figure | trainq | baseline | ratio | goal | |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def write_results(tables: list[Table], path: Path = RESULTS) -> None:
    """Write ``tables`` under a heading naming the machine; prints where."""
    import time

    text = [f"## Benchmark run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", f"Machine: {describe_machine()}", ""]
    text += [table.markdown() for table in tables]
    path.write_text("\n".join(text))
    print(f"wrote {path}", flush=True)
