"""Artifact uploads on a background thread, so training goes on while S3 is slow or down.

Uploads run in submission order (a checkpoint is in S3 before any later one), one at a time.
Each retries through outages — boto3's ``standard`` retry mode per request, and around that a
backoff loop until ``deadline_s`` — and only then counts as failed. :meth:`BackgroundUploader.drain`
waits for everything and raises if anything failed, so a job is never called done with an
artifact missing.

A checkpoint is handed over as a snapshot and a function that writes it (``torch.save``), called on
the upload thread: the training loop pays only for the copy. One checkpoint uploads at a time; a
newer one submitted with the same ``coalesce`` key replaces one still waiting (skip-and-coalesce),
so training never waits for S3 and at most one snapshot per key waits in memory.

The upload thread runs at a lower CPU priority (``UPLOAD_NICE``; on Linux ``nice`` is per thread
and inherited by the threads it starts, so boto3's transfer threads run at it too): writing and
uploading a checkpoint yields the CPU to the training threads, and gets it whenever they wait.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.storage import Storage

logger = logging.getLogger(__name__)

#: ``nice`` increment of the upload thread (and the transfer threads it starts), Linux only.
UPLOAD_NICE = 10


class UploadError(RuntimeError):
    """An artifact could not be uploaded before the deadline (an infrastructure failure)."""


@dataclass
class _Upload:
    files: list[tuple[Path, str]]  # (local path, destination URI)
    on_done: Callable[[], None] | None = None
    key: str | None = None  # uploads with the same key replace a waiting one, in its place
    coalesce: str | None = None  # uploads with the same coalesce key drop a waiting one, and go last
    write: Callable[[], object] | None = None  # writes the (single) local file first, on the upload thread
    cleanup: list[Path] = field(default_factory=list)


class BackgroundUploader:
    """One thread that uploads submitted files to S3, in order, retrying until a deadline.

    Args:
        storage: where to upload.
        deadline_s: seconds one upload may keep failing (S3 outage) before it is given up.
        max_backoff_s: longest sleep between retries, in seconds.
    """

    def __init__(self, storage: Storage, deadline_s: float, max_backoff_s: float = 10.0) -> None:
        self.storage = storage
        self.deadline_s = deadline_s
        self.max_backoff_s = max_backoff_s
        self._queue: deque[_Upload] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="trainq-upload-"))
        self._thread = threading.Thread(target=self._run, name="trainq-uploader", daemon=True)
        self._thread.start()

    def submit_file(
        self,
        path: Path,
        uri: str,
        on_done: Callable[[], None] | None = None,
        *,
        write: Callable[[], object] | None = None,
        coalesce: str | None = None,
    ) -> None:
        """Upload ``path`` to ``uri`` and then delete ``path``; call ``on_done`` once it is in S3.

        Args:
            write: called on the upload thread, just before the upload, to write ``path`` (a
                checkpoint's ``torch.save``). If it raises, the upload fails at once (no retry:
                a local error is not an outage) with :class:`UploadError` wrapping the error.
            coalesce: a waiting (not yet started) upload with the same key is dropped — its
                ``write`` and ``on_done`` never run — and this one queues last, behind everything
                submitted before it (so behind the TensorBoard events it relies on).
        """
        self._put(_Upload([(path, uri)], on_done, coalesce=coalesce, write=write, cleanup=[path]))

    def raise_if_failed(self) -> None:
        """Raise now if an upload has failed (rather than at the next :meth:`drain`).

        Raises:
            UploadError: an upload failed past the deadline, or its ``write`` failed.
        """
        if self.error is not None:
            raise UploadError(str(self.error)) from self.error

    def submit_snapshot(self, local_dir: Path, uri: str, key: str) -> None:
        """Upload a copy of every file under ``local_dir`` (taken now) to ``uri/<relative path>``.

        Files still being written (TensorBoard event files) are copied first, so the upload sees
        a consistent prefix of each. A waiting snapshot with the same ``key`` is replaced.
        """
        snapshot = Path(tempfile.mkdtemp(dir=self._scratch))
        files = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(local_dir).as_posix()
            copy = snapshot / relative
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            files.append((copy, f"{uri.rstrip('/')}/{relative}"))
        self._put(_Upload(files, key=key, cleanup=[snapshot]))

    def _put(self, upload: _Upload) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("uploader is closed")
            if upload.key is not None:
                for index, waiting in enumerate(self._queue):
                    if waiting.key == upload.key:
                        self._remove(waiting)
                        self._queue[index] = upload
                        self._cond.notify_all()
                        return
            if upload.coalesce is not None:
                for waiting in [w for w in self._queue if w.coalesce == upload.coalesce]:
                    logger.info("upload of %s skipped: %s replaces it", waiting.files[0][1], upload.files[0][1])
                    self._queue.remove(waiting)
                    self._remove(waiting)
            self._queue.append(upload)
            self._cond.notify_all()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted upload is done, or ``timeout_s`` seconds pass.

        Returns:
            True when everything is uploaded; False on timeout.

        Raises:
            UploadError: an upload failed past the deadline.
        """
        with self._cond:
            done = self._cond.wait_for(lambda: (not self._queue and not self._busy) or self.error is not None, timeout_s)
            if self.error is not None:
                raise UploadError(str(self.error)) from self.error
            return bool(done)

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Drop uploads not yet started and stop the thread; remove scratch files.

        Call :meth:`drain` first to keep them. An upload in flight is given ``join_timeout_s``
        seconds; after that the (daemon) thread is left to finish or fail on its own.
        """
        with self._cond:
            self._closed = True
            while self._queue:
                self._remove(self._queue.popleft())
            self._cond.notify_all()
        self._thread.join(join_timeout_s)
        if not self._thread.is_alive():
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _run(self) -> None:
        _lower_thread_priority(UPLOAD_NICE)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                upload = self._queue.popleft()
                self._busy = True
            try:
                if self.error is None:
                    if upload.write is not None:
                        self._write(upload)
                    for path, uri in upload.files:
                        self._upload_with_retry(path, uri)
                    if upload.on_done is not None:
                        upload.on_done()
            except BaseException as exc:  # kept for drain(); the thread goes on to clean up
                logger.error("upload failed: %s", exc)
                self.error = exc
            finally:
                self._remove(upload)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    @staticmethod
    def _write(upload: _Upload) -> None:
        write, upload.write = upload.write, None  # drops the snapshot once written
        try:
            write()
        except Exception as exc:
            raise UploadError(f"writing {upload.files[0][1]} before its upload failed: {exc}") from exc

    def _upload_with_retry(self, path: Path, uri: str) -> None:
        if not path.is_file():  # our bug, not an outage: retrying would only hide it
            raise UploadError(f"upload of {uri}: local file {path} is missing")
        first_failure: float | None = None
        backoff = 0.5
        while True:
            try:
                self.storage.upload_file(path, uri)
                if first_failure is not None:
                    logger.info("upload of %s succeeded after %.0f s of failures", uri, time.monotonic() - first_failure)
                return
            except Exception as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.deadline_s:
                    raise UploadError(f"upload of {uri} failed for {now - first_failure:.0f} s: {exc}") from exc
                logger.warning("upload of %s failed (%s); retrying in %.1f s", uri, exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    @staticmethod
    def _remove(upload: _Upload) -> None:
        upload.write = None
        for path in upload.cleanup:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's ``nice`` value by ``increment`` (Linux, where ``nice`` is per
    thread: ``setpriority(PRIO_PROCESS, tid)``, see sched(7)); elsewhere do nothing, since there
    it would renice the whole process."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
    except OSError as exc:  # e.g. a seccomp profile that refuses it: uploads still work
        logger.warning("could not lower the upload thread's priority: %s", exc)
