"""The per-attempt log capture (worker/joblog.py) against the session stack's S3 server."""

from __future__ import annotations

import logging
import threading
import uuid
import warnings

from shared.records import JobState, Progress
from shared.storage import Storage, parse_s3_uri
from worker.joblog import JobLog
from worker.presence import STATS, WorkerStats


def _object(storage: Storage, uri: str) -> tuple[str, dict]:
    bucket, key = parse_s3_uri(uri)
    answer = storage.client.get_object(Bucket=bucket, Key=key)
    return answer["Body"].read().decode(), answer["Metadata"]


def test_an_attempt_log_keeps_the_jobs_records_and_is_marked_complete(storage: Storage, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # the worker runs with --loglevel=INFO
    settings = storage.settings.model_copy(update={"data_cache_dir": tmp_path, "log_upload_interval_s": 0.2})
    job_id = uuid.uuid4().hex
    engine = logging.getLogger("worker.training.engine")
    job_log = JobLog.start(job_id, 2, "w1@host", storage, settings)
    try:
        engine.info("job %s: epoch 1/3 val_loss 0.5", job_id)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("lr scheduler called before optimizer", UserWarning)
        try:
            raise RuntimeError(f"DataLoader worker (pid 42) exited; cache {tmp_path}/x, S3 at http://10.1.2.3:9000/b")
        except RuntimeError:
            engine.exception("job %s: attempt failed", job_id)
        others = [
            threading.Thread(target=engine.info, args=("job %s: upload of checkpoints/step-1.pt done", job_id)),
            threading.Thread(target=engine.info, args=("job %s: another job's line", "f" * 32)),
        ]
        for thread in others:
            thread.start()
            thread.join()
    finally:
        job_log.close()
    text, metadata = _object(storage, f"s3://trainq/jobs/{job_id}/logs/attempt-2.log")
    assert metadata == {"complete": "true"}
    lines = text.splitlines()
    assert lines[0].startswith(f"trainq: job {job_id}, attempt 2, on worker w1@host")
    assert "INFO worker.training.engine: job" in lines[1] and "epoch 1/3" in lines[1]
    assert "WARNING py.warnings:" in text and "lr scheduler called before optimizer" in text
    assert "Traceback (most recent call last):" in text and "RuntimeError: DataLoader worker (pid 42) exited" in text
    assert "cache <cache>/x, S3 at <endpoint>" in text and "10.1.2.3" not in text
    assert "step-1.pt done" in text and "another job's line" not in text
    engine.info("job %s: after the attempt", job_id)
    assert "after the attempt" not in _object(storage, f"s3://trainq/jobs/{job_id}/logs/attempt-2.log")[0]
    assert not (tmp_path / "logs" / f"{job_id}-attempt-2.log").exists()


def test_a_log_is_capped(storage: Storage, tmp_path):
    settings = storage.settings.model_copy(update={"data_cache_dir": tmp_path, "log_max_bytes": 2048})
    job_id = uuid.uuid4().hex
    job_log = JobLog.start(job_id, 1, "w1", storage, settings)
    for index in range(100):
        logging.getLogger("worker.training.engine").warning("line %d %s", index, "x" * 40)
    job_log.close()
    text, _ = _object(storage, f"s3://trainq/jobs/{job_id}/logs/attempt-1.log")
    assert len(text.encode()) <= 2048 + 200
    assert text.rstrip().endswith("later lines are in the worker's log") and "line 99 " not in text


def test_worker_stats_count_attempts_and_step_time():
    stats = WorkerStats()
    stats.count_outcome("a", JobState.SUCCEEDED)  # a delivery that ran nothing: not counted
    stats.job_started("a")
    stats.observe_progress(Progress(step=10, runtime_s=5.0, samples_per_s=640.0))
    stats.observe_progress(Progress(step=30, runtime_s=9.0, samples_per_s=650.0))
    current, metrics = stats.snapshot()
    assert current == "a" and metrics.step_time_s == 0.2 and metrics.samples_per_s == 650.0
    stats.add_upload_bytes(1000)
    stats.job_ended()
    stats.count_outcome("a", JobState.SUCCEEDED)
    stats.count_outcome("a", JobState.SUCCEEDED)  # once per attempt
    current, metrics = stats.snapshot()
    assert current is None and metrics.jobs_total == {"succeeded": 1} and metrics.upload_bytes_total == 1000
    assert metrics.samples_per_s is None and STATS is not stats
