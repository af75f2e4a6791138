"""The background uploader: order, repeated names, a missing file is a bug (not an outage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.storage import Storage
from worker.training.uploads import BackgroundUploader, UploadError


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
