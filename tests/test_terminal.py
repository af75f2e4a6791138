"""What the CLI draws on a terminal, without a stack: the one sanitizer (trainq/terminal.py), the
progress bar on a narrow terminal, the phase and reason lines (issue 17, issue 20 items 5-7)."""

from __future__ import annotations

import io
import re
import time

import pytest

from shared.records import JobRecord, JobState
from tests.fixtures import fast_digits_spec
from trainq import terminal
from trainq.cli import _status_rows
from trainq.display import Watcher, phase_text, progress_text, summary_line


def record(**fields) -> JobRecord:
    """A job record as the API returns one (running at step 200 of 450 unless ``fields`` say otherwise)."""
    progress = {"phase": "training", "epoch": 4, "epochs": 10, "step": 200, "total_steps": 450, "train_loss": 0.1234,
                "val_metrics": {"val_loss": 0.0456, "val_accuracy": 0.9889, "val_top5_accuracy": 1.0}, "eta_s": 12}
    values = {"id": "f624d259" + "0" * 24, "state": "running", "spec": fast_digits_spec(), "queue": "default",
              "created_at": time.time()} | fields
    values["progress"] = progress | fields.get("progress", {})
    return JobRecord.model_validate(values)


def terminal_console(width: int = 80) -> terminal.SafeConsole:
    return terminal.SafeConsole(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")


@pytest.mark.parametrize("hostile", ["[/]", "[link=https://evil.example]click[/link]", "[bold red]x", ":smile:", "a\x1b]8;;https://e.x\x1b\\b"])
def test_outside_text_prints_as_itself(hostile):
    console = terminal_console()
    console.print(f"name {hostile}")  # a MarkupError here made `trainq list` exit 1
    out = console.file.getvalue()
    assert f"name {terminal.terminal_text(hostile)}" in out
    assert "\x1b]8;" not in out  # no hyperlink (OSC 8) drawn
    assert "😄" not in out


def test_controls_are_escaped_once_newlines_only_where_asked():
    assert terminal.terminal_text("a\x1b[2Jb\rc") == "a\\x1b[2Jb\\rc"
    assert terminal.terminal_text("x\ny\x07", keep_newlines=True) == "x\ny\\x07"
    out = io.StringIO()
    terminal.write("job \x1b[31mred", file=out)
    assert out.getvalue() == "job \\x1b[31mred\n"


@pytest.mark.parametrize("state", ["running", "succeeded"])
def test_the_bar_keeps_the_state_and_the_bar_at_80_columns(state, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    console = terminal.SafeConsole(file=io.StringIO(), force_terminal=True, color_system=None)
    assert console.width == 80
    with Watcher(console) as watcher:
        watcher.update(record(state=state))
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", console.file.getvalue())  # each redraw on a line of its own
    last = [line for line in drawn.splitlines() if line.strip()][-1]
    # The state whole (it was cut to `r…`/`su…`), the bar, the step count and the ETA; the metrics give way.
    assert f"{state} ━" in last and "200/450 steps" in last and last.rstrip().endswith("ETA 0m12s"), last
    assert len(last.rstrip()) <= 80


def test_phase_shows_while_the_data_downloads():
    downloading = record(progress={"phase": "downloading", "files_done": 282, "files_total": 1797, "bytes_done": 2**20,
                                   "bytes_total": 7 * 2**20, "step": 0, "total_steps": 0, "epoch": 0})
    assert phase_text(downloading) == "downloading 282/1797 files (1.0/7.0 MiB)"
    assert progress_text(downloading) == "downloading 282/1797 files (1.0/7.0 MiB)"
    small = record(progress={"phase": "downloading", "files_done": 1, "files_total": 9, "bytes_done": 51200, "bytes_total": 204800})
    assert phase_text(small) == "downloading 1/9 files (50.0/200.0 KiB)"
    assert phase_text(record(progress={"phase": "building_model"})) == "building the model"
    assert phase_text(record(state="queued")) == "waiting on queue default"
    assert phase_text(record()) is None  # training: the metrics say it


def test_off_a_terminal_the_watcher_prints_a_line_per_phase():
    console = terminal.SafeConsole(file=io.StringIO(), width=200)
    with Watcher(console) as watcher:
        for phase, done in (("downloading", 0), ("downloading", 1797), ("verifying", 1797)):
            watcher.update(record(progress={"phase": phase, "files_done": done, "files_total": 1797, "step": 0, "epoch": 0}))
    lines = console.file.getvalue().splitlines()
    assert lines == ["running", "downloading 0/1797 files", "verifying 1797/1797 files"], lines


def test_a_cancelled_jobs_summary_says_why():
    cancelled = record(state="cancelled", transitions=[{"state": "cancelled", "at": 1.0, "reason": "cancelled by request at step 200"}])
    assert summary_line(cancelled).endswith("; cancelled by request at step 200")


def test_a_state_prints_as_the_api_writes_it():
    assert str(JobState.SUCCEEDED) == "succeeded" and f"{JobState.CANCELLED}" == "cancelled"
    assert str(record(state="succeeded").state) == "succeeded"


def test_status_of_a_cancelled_job_shows_its_reason_and_checkpoint():
    # Only `--json` had them (issue 20 item 6).
    checkpoint = "s3://trainq/jobs/f624d259/checkpoints/step-200.pt"
    cancelled = record(state="cancelled", transitions=[{"state": "cancelled", "at": 1.0, "reason": "cancelled by request at step 200"}],
                       artifacts={"checkpoints": [checkpoint]})
    rows = dict(_status_rows(cancelled))
    assert rows["reason"] == "cancelled by request at step 200" and rows["last checkpoint"] == checkpoint
    assert "phase" not in rows
    assert dict(_status_rows(record(progress={"phase": "verifying", "files_done": 5, "files_total": 9})))["phase"] == "verifying 5/9 files"
