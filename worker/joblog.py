"""Each attempt's training log, captured on the worker and uploaded next to the job's artifacts.

While an attempt runs, a logging handler on the root logger keeps the records that belong to the
job — every record of the thread that runs it (the engine's lines, warnings, DataLoader worker
errors and tracebacks re-raised in the training loop; with Celery's stdout redirection also
``print``), and records of other threads that name the job id (uploads, the heartbeat) — in a
local file, and a thread uploads that file to ``<prefix>/<job_id>/logs/attempt-<N>.log`` every
``LOG_UPLOAD_INTERVAL_S`` while it grows. The last upload, when the attempt ends, carries the
object metadata ``complete: true``, which tells ``GET /jobs/{id}/logs?follow=true`` that the
attempt's log is whole. Internal addresses (service URLs, ``ip:port``) and the worker's cache
folder are redacted: the log is shown to the job's owner.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from shared.joblogs import COMPLETE_METADATA, log_uri
from shared.sanitize import EscapeControlsFilter, redact_addresses
from shared.settings import Settings
from shared.storage import Storage, parse_s3_uri

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _AttemptHandler(logging.Handler):
    """Writes the job's records to a file, up to ``max_bytes`` (then one line saying so)."""

    def __init__(self, path: Path, job_id: str, thread_id: int, max_bytes: int, cache_dir: Path) -> None:
        super().__init__(logging.INFO)
        self.job_id, self.thread_id, self.max_bytes = job_id, thread_id, max_bytes
        self.cache_dir = str(cache_dir)
        self.ignored_threads: set[int] = set()
        self.written = 0
        self.file = open(path, "a", encoding="utf-8", errors="backslashreplace")
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.addFilter(EscapeControlsFilter())

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread in self.ignored_threads:
            return False
        if record.thread != self.thread_id and self.job_id not in record.getMessage():
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def write(self, text: str) -> None:
        """Append ``text`` (redacted) unless the cap is reached."""
        text = redact_addresses(text).replace(self.cache_dir, "<cache>")
        with self.lock:
            if self.written >= self.max_bytes:
                return
            if self.written + len(text.encode()) > self.max_bytes:
                text = f"... log truncated at {self.max_bytes} bytes (LOG_MAX_BYTES); later lines are in the worker's log\n"
            self.written += len(text.encode())
            self.file.write(text)
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            self.file.close()
        super().close()


class JobLog:
    """The captured log of one attempt; :meth:`start` it when the attempt begins, :meth:`close` at its end.

    Args:
        job_id, attempt: the attempt (``attempt`` counts from 1).
        worker_name: the Celery node running it (written in the first line).
        storage: where the log is uploaded.
        settings: ``LOG_UPLOAD_INTERVAL_S``, ``LOG_MAX_BYTES``, ``DATA_CACHE_DIR`` (the local file).
    """

    def __init__(self, job_id: str, attempt: int, worker_name: str, storage: Storage, settings: Settings) -> None:
        self.job_id, self.attempt, self.storage = job_id, attempt, storage
        self.uri = log_uri(storage, job_id, attempt)
        self.interval_s = settings.log_upload_interval_s
        folder = settings.data_cache_dir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{job_id}-attempt-{attempt}.log"
        self.path.unlink(missing_ok=True)
        self.handler = _AttemptHandler(self.path, job_id, threading.get_ident(), settings.log_max_bytes, settings.data_cache_dir)
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.handler.write(f"trainq: job {job_id}, attempt {attempt}, on worker {worker_name}, started {started}\n")
        self._uploaded_size = -1
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"trainq-joblog-{job_id[:8]}", daemon=True)

    @classmethod
    def start(cls, job_id: str, attempt: int, worker_name: str, storage: Storage, settings: Settings) -> JobLog:
        """Begin capturing (root logger handler, Python warnings as log records) and uploading."""
        job_log = cls(job_id, attempt, worker_name, storage, settings)
        logging.captureWarnings(True)  # warnings.warn(...) as records of the thread that warned
        logging.getLogger().addHandler(job_log.handler)
        job_log._thread.start()
        job_log.handler.ignored_threads.add(job_log._thread.ident or 0)
        return job_log

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._upload(complete=False)

    def _upload(self, *, complete: bool) -> bool:
        """Upload the file if it changed (always when ``complete``); False if S3 refused."""
        with self.handler.lock:
            data = self.path.read_bytes() if self.path.exists() else b""
        if not complete and len(data) == self._uploaded_size:
            return True
        bucket, key = parse_s3_uri(self.uri)
        try:
            self.storage.client.put_object(
                Bucket=bucket, Key=key, Body=data, ContentType="text/plain; charset=utf-8",
                Metadata={COMPLETE_METADATA: "true" if complete else "false"},
            )
        except Exception as exc:  # best effort: a log never fails a job
            logger.warning("job %s: log upload failed (%s); trying again later", self.job_id, exc)
            return False
        self._uploaded_size = len(data)
        from worker.presence import STATS

        STATS.add_upload_bytes(len(data))
        return True

    def close(self, final_tries: int = 5) -> None:
        """Stop capturing and upload the whole log, marked complete (a few tries, then give up)."""
        logging.getLogger().removeHandler(self.handler)
        self._stopped.set()
        self._thread.join(timeout=30)
        for attempt in range(final_tries):
            if self._upload(complete=True):
                break
            time.sleep(min(2**attempt, 5))
        self.handler.close()
        self.path.unlink(missing_ok=True)
