"""The background uploader: order, repeated names, a missing file is a bug (not an outage),
checkpoints written on its thread and coalesced while one is in flight."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import pytest

from shared.storage import Storage
from worker.faults import Fault, classify, describe
from worker.training.uploads import UPLOAD_NICE, BackgroundUploader, UploadError


def test_uploads_land_in_order_and_a_name_can_be_uploaded_again(tmp_path: Path, storage: Storage):
    uploader = BackgroundUploader(storage, deadline_s=30)
    done = []
    for version in range(3):  # best.pt saved three times, each from its own local file
        path = tmp_path / f"{version}-best.pt"
        path.write_text(f"version {version}")
        uploader.submit_file(path, "s3://trainq/tests/uploads/best.pt", on_done=lambda v=version: done.append(v))
    assert uploader.drain(timeout_s=30)
    uploader.close()
    assert done == [0, 1, 2]
    local = storage.download_file("s3://trainq/tests/uploads/best.pt", tmp_path / "back.pt")
    assert local.read_text() == "version 2" and not list(tmp_path.glob("*-best.pt"))


def test_a_missing_local_file_fails_at_once(tmp_path: Path, storage: Storage):
    uploader = BackgroundUploader(storage, deadline_s=600)
    uploader.submit_file(tmp_path / "gone.pt", "s3://trainq/tests/uploads/gone.pt")
    with pytest.raises(UploadError, match="local file .*gone.pt is missing"):
        uploader.drain(timeout_s=10)
    uploader.close()


class RecordingStorage(Storage):
    """The real S3 storage, noting each URI once its upload has returned."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.uploaded: list[str] = []

    def upload_file(self, path: Path, uri: str) -> str:
        super().upload_file(path, uri)
        self.uploaded.append(uri.rsplit("/", 1)[-1])
        return uri


def test_a_newer_checkpoint_replaces_a_waiting_one_and_queues_behind_the_events(tmp_path: Path, storage: Storage):
    recording = RecordingStorage(storage.settings)
    uploader = BackgroundUploader(recording, deadline_s=30)
    release, started, written, done = threading.Event(), threading.Event(), [], []

    def submit(name: str, *, hold: bool = False) -> None:
        path = tmp_path / name

        def write() -> None:
            if hold:
                started.set()
                assert release.wait(30)  # step-1 stays in flight until everything else is queued
            path.write_text(name)
            written.append(name)

        uploader.submit_file(path, f"s3://trainq/tests/coalesce/{name}", on_done=lambda: done.append(name),
                             write=write, coalesce="step")

    events = tmp_path / "events"
    events.mkdir()
    submit("step-1", hold=True)
    assert started.wait(30)  # in flight (a queued one would be replaced by step-2 too)
    (events / "tb").write_text("up to step 2")
    uploader.submit_snapshot(events, "s3://trainq/tests/coalesce/events", key="tensorboard")
    submit("step-2")
    (events / "tb").write_text("up to step 3")
    uploader.submit_snapshot(events, "s3://trainq/tests/coalesce/events", key="tensorboard")
    submit("step-3")  # replaces the waiting step-2, which is never written nor uploaded
    release.set()
    assert uploader.drain(timeout_s=30)
    uploader.close()
    assert written == done == ["step-1", "step-3"]
    assert recording.uploaded == ["step-1", "tb", "step-3"]  # the events step-3 relies on land first
    back = storage.download_file("s3://trainq/tests/coalesce/events/tb", tmp_path / "tb-back")
    assert back.read_text() == "up to step 3"
    keys = {obj.key.rsplit("/", 1)[-1] for obj in storage.list_objects("s3://trainq/tests/coalesce/")}
    assert keys == {"step-1", "tb", "step-3"}


def test_a_failed_checkpoint_write_fails_the_upload_classified_by_its_cause(tmp_path: Path, storage: Storage):
    # torch.save now runs on the upload thread: its error must still reach the job, at the next
    # checkpoint or drain, and classify as what it is (a full disk is no S3 outage: no retry).
    uploader = BackgroundUploader(storage, deadline_s=600)
    calls = []

    def write() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    uploader.submit_file(tmp_path / "step-1.pt", "s3://trainq/tests/uploads/step-1.pt", write=write, coalesce="step")
    with pytest.raises(UploadError, match="writing s3://trainq/tests/uploads/step-1.pt before its upload failed: .*No space left") as failed:
        uploader.drain(timeout_s=10)
    # A full disk is a job error with advice since issue 19 (resource faults of the job's own making),
    # not an internal one; either way never a retry.
    assert calls == [1] and classify(failed.value) is Fault.JOB
    assert "the worker's disk is full" in describe(failed.value)
    with pytest.raises(UploadError):
        uploader.raise_if_failed()
    uploader.close()
    assert "step-1.pt" not in {obj.key.rsplit("/", 1)[-1] for obj in storage.list_objects("s3://trainq/tests/uploads/")}


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
def test_the_upload_thread_runs_at_a_lower_priority_than_training(tmp_path: Path, storage: Storage):
    uploader = BackgroundUploader(storage, deadline_s=30)
    seen = {}

    def write() -> None:  # runs on the upload thread
        seen["upload"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        (tmp_path / "c.pt").write_text("c")

    uploader.submit_file(tmp_path / "c.pt", "s3://trainq/tests/uploads/nice.pt", write=write)
    assert uploader.drain(timeout_s=30)
    uploader.close()
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen["upload"] == min(training + UPLOAD_NICE, 19)
