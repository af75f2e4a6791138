"""How a job is shown on a terminal: its progress text, a live bar (or a line per state, phase and
epoch off a terminal) and its summary. Used by the CLI and the demo; every string from the server
goes through :mod:`trainq.terminal`."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

from shared.records import JobPhase, JobRecord, JobState, JobSummary
from trainq import terminal


def format_when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def metrics_text(record: JobRecord | JobSummary, *, with_step: bool = True) -> str:
    p = record.progress
    parts = [f"epoch {p.epoch}/{p.epochs}"] + ([f"step {p.step}/{p.total_steps or '?'}"] if with_step else [])
    if p.train_loss is not None:
        parts.append(f"loss {p.train_loss:.4f}")
    metrics = p.val_metrics or ({"val_accuracy": p.val_accuracy} if p.val_accuracy is not None else {})
    parts += [f"{name} {value:.4f}" for name, value in metrics.items()]
    return "  ".join(parts)


#: What a job does before its first step, in words (the phases with counts add them).
_PHASE_WORDS = {
    JobPhase.DOWNLOADING: "downloading the data",
    JobPhase.VERIFYING: "verifying the images",
    JobPhase.BUILDING_MODEL: "building the model",
    JobPhase.UPLOADING: "uploading the final checkpoint",
}


def phase_text(record: JobRecord | JobSummary) -> str | None:
    """What a job does while it is not stepping (``downloading 282/1797 files``); None while it trains."""
    p = record.progress
    if record.state is JobState.QUEUED:
        return f"waiting on queue {record.queue}"
    if record.state.is_final or p.phase not in _PHASE_WORDS:
        return None
    text = _PHASE_WORDS[p.phase]
    if p.files_total:
        text = f"{p.phase.value} {p.files_done or 0}/{p.files_total} files"
        if p.phase is JobPhase.DOWNLOADING and p.bytes_total:
            unit, scale = ("MiB", 2**20) if p.bytes_total >= 2**20 else ("KiB", 2**10)
            text += f" ({(p.bytes_done or 0) / scale:.1f}/{p.bytes_total / scale:.1f} {unit})"
    return text


def progress_text(record: JobRecord | JobSummary, *, with_step: bool = True) -> str:
    """The phase while the job prepares, else epoch, step, loss and validation metrics."""
    return phase_text(record) or metrics_text(record, with_step=with_step)


class _FitColumn(ProgressColumn):
    """A task field as text that gives way first on a narrow terminal, cut with an ellipsis."""

    def __init__(self, field: str) -> None:
        self.field = field
        # Wrappable for the table's width sharing (so this column shrinks before the state or the
        # bar), while the text itself never wraps.
        super().__init__(table_column=Column(no_wrap=False, ratio=1))

    def render(self, task: Task) -> Text:
        return Text(terminal.terminal_text(task.fields[self.field]), no_wrap=True, overflow="ellipsis")


#: Seconds between lines of a phase's counts off a terminal (downloads of big data sets).
PHASE_LINE_INTERVAL_S = 5.0


class Watcher:
    """Shows a job's progress: a live bar on a terminal, else a line per state, phase and epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last_epoch, self.last_state, self.last_phase = 0, None, None
        self.last_phase_line = 0.0
        self.progress: Progress | None = None
        self.task = None
        if console.is_terminal:
            # The state and the bar keep their width on a narrow terminal (80 columns); the text
            # after them is cut instead.
            self.progress = Progress(
                TextColumn("{task.fields[state]}", style="bold", markup=False, table_column=Column(no_wrap=True)),
                BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("steps", markup=False),
                _FitColumn("metrics"), TextColumn("ETA {task.fields[eta]}", markup=False, table_column=Column(no_wrap=True)),
                console=console, transient=False,
            )

    def __enter__(self) -> Watcher:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("training", total=None, state="queued", metrics="", eta="-")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, record: JobRecord) -> None:
        p = record.progress
        if self.progress is not None:
            self.progress.update(
                self.task, total=p.total_steps or None, completed=p.step, state=record.state.value,
                metrics=progress_text(record, with_step=False), eta=format_duration(p.eta_s),
            )
            return
        if record.state != self.last_state and not record.state.is_final:
            self.last_state = record.state
            self.console.print(f"{record.state.value}" + (f" on {record.worker}" if record.state is JobState.RUNNING and record.worker else ""))
        phase = phase_text(record) if record.state is JobState.RUNNING else None
        now = time.monotonic()
        if phase is not None and (p.phase != self.last_phase or now - self.last_phase_line >= PHASE_LINE_INTERVAL_S):
            self.console.print(phase)
            self.last_phase_line = now
        self.last_phase = p.phase
        # One line per epoch completed, once its validation is in: the record counts the epoch
        # as done while it validates, and shows the previous epoch's metrics until then.
        if p.epoch > self.last_epoch and p.phase != "validating":
            self.last_epoch = p.epoch
            self.console.print(f"{metrics_text(record)}  ETA {format_duration(p.eta_s)}")
        if record.state != self.last_state and record.state.is_final:  # after the last epoch's line
            self.last_state = record.state
            self.console.print(record.state.value)


def summary_line(record: JobRecord) -> str:
    p = record.progress
    line = f"job {record.id} {record.state.value}"
    if record.device:
        line += f" on {record.device}"
    line += f": {p.epoch} epochs, {p.step} steps"
    for name, value in p.val_metrics.items():
        line += f", {name} {value:.4f}"
    if record.error:
        line += f"; {record.error}"
    elif record.state is JobState.CANCELLED and last_reason(record):
        line += f"; {last_reason(record)}"
    return line


def last_reason(record: JobRecord) -> str | None:
    """Why the job is in its state (the last transition's reason)."""
    return record.transitions[-1].reason if record.transitions else None


def history_text(record: JobRecord) -> str:
    """The job's states in order, each with its reason: ``queued → running → preempted (…) → running``."""
    return " → ".join(t.state.value + (f" ({t.reason})" if t.reason else "") for t in record.transitions)
