"""The Celery task: load the job's spec from its record, run the engine, record the outcome.

Thin on purpose: all training is in :mod:`worker.training`. A failing job never crashes the
worker: the error is recorded on the job (``failed``), logged with the job id, and the message is
acknowledged.
"""

from __future__ import annotations

import logging
import socket
import time
import traceback

from pydantic import ValidationError

from shared.exceptions import InvalidTransitionError, JobFailure, JobNotFoundError
from shared.jobs import Artifacts, DatasetInfo, JobState, JobStore, Progress
from shared.queue import TRAIN_TASK
from shared.settings import Settings, get_settings
from shared.spec import JobSpec
from shared.storage import Storage
from worker.celery_app import app
from worker.training import TrainingCallbacks, run_training

logger = logging.getLogger(__name__)


class RecordCallbacks(TrainingCallbacks):
    """Writes the engine's reports into the job record in Redis."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.artifacts = Artifacts()

    def on_start(self, *, device: str, dataset: DatasetInfo, tensorboard_uri: str) -> None:
        self.artifacts.tensorboard = tensorboard_uri
        self.store.update(self.job_id, device=device, dataset=dataset, artifacts=self.artifacts)

    def on_progress(self, progress: Progress) -> None:
        self.store.update(self.job_id, progress=progress)

    def on_checkpoint(self, uri: str) -> None:
        self.artifacts.checkpoints.append(uri)
        if uri.endswith("/final.pt"):
            self.artifacts.final_checkpoint = uri
        self.store.update(self.job_id, artifacts=self.artifacts)


def execute_job(job_id: str, store: JobStore, storage: Storage, settings: Settings) -> JobState:
    """Run job ``job_id`` to a final state and return that state.

    A message for a job that is no longer ``queued`` (already running elsewhere, or finished) is
    a duplicate delivery and is skipped. The spec is validated again: a record written by an
    older API, or edited by hand, must not reach the GPU unchecked.
    """
    try:
        record = store.get(job_id)
    except JobNotFoundError:
        logger.error("job %s: no record; message dropped", job_id)
        return JobState.FAILED
    if record.state is not JobState.QUEUED:
        logger.warning("job %s: is %s, not queued; duplicate delivery skipped", job_id, record.state.value)
        return record.state
    try:
        store.transition(job_id, JobState.RUNNING, worker=socket.gethostname())
    except InvalidTransitionError as exc:  # another worker took it between get() and here
        logger.warning("job %s: %s; skipped", job_id, exc)
        return store.get(job_id).state
    callbacks = RecordCallbacks(store, job_id)
    try:
        spec = JobSpec.model_validate(record.spec.model_dump(mode="json"))
        result = run_training(job_id, spec, storage, settings, callbacks)
    except (JobFailure, ValidationError) as exc:
        logger.warning("job %s: failed: %s", job_id, exc)
        store.transition(job_id, JobState.FAILED, error=str(exc))
        return JobState.FAILED
    except Exception as exc:
        logger.exception("job %s: crashed", job_id)
        store.transition(
            job_id, JobState.FAILED, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"
        )
        return JobState.FAILED
    callbacks.artifacts.final_checkpoint = result.final_checkpoint
    store.transition(job_id, JobState.SUCCEEDED, artifacts=callbacks.artifacts)
    logger.info(
        "job %s: succeeded in %.1f s, val_accuracy %.4f", job_id, time.time() - record.created_at, result.val_accuracy
    )
    return JobState.SUCCEEDED


_store: JobStore | None = None
_storage: Storage | None = None


@app.task(name=TRAIN_TASK)
def train(job_id: str) -> str:
    """Celery entry point (task ``trainq.train``): run one job by id; return its final state."""
    global _store, _storage
    settings = get_settings()
    if _store is None:
        _store = JobStore.from_url(settings.redis_url)
        _storage = Storage(settings)
    return execute_job(job_id, _store, _storage, settings).value
