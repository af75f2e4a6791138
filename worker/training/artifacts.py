"""Where a job's files go: checkpoints and TensorBoard events, written and uploaded in the background.

One :class:`ArtifactWriter` per rank and attempt. Only rank 0 uploads; every rank reads the
job's checkpoints back when it resumes.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError
from torch.utils.tensorboard import SummaryWriter

from shared.sanitize import public_message
from shared.settings import Settings
from shared.storage import Storage
from worker.faults import Fault, classify, in_stage
from worker.training.checkpoint import (
    CheckpointKind,
    Snapshot,
    checkpoint_name,
    checkpoint_uris,
    load_checkpoint,
    write_checkpoint,
)
from worker.training.contract import StopReason, TrainingCallbacks, TrainingStopped
from worker.training.distributed import ProcessGroup
from worker.training.retention import delete_checkpoint, stale_checkpoints
from worker.training.state import TrainState
from worker.training.uploads import BackgroundUploader

logger = logging.getLogger(__name__)


def _coalesce_key(kind: CheckpointKind) -> str | None:
    """Which waiting checkpoint upload a new one of ``kind`` replaces: a newer ``step-*``
    replaces a waiting ``step-*``, ``best.pt`` a waiting ``best.pt``; ``final.pt`` none."""
    return None if kind is CheckpointKind.FINAL else kind.value


class ArtifactWriter:
    """The job's work folder on this worker, its uploader, and what goes through them.

    With ``keep_last`` (the spec's ``checkpoint.keep_last``), each uploaded step checkpoint
    deletes the step checkpoints beyond the newest ``keep_last`` (:mod:`worker.training.retention`).
    """

    def __init__(
        self, job_id: str, storage: Storage, settings: Settings, callbacks: TrainingCallbacks, group: ProcessGroup,
        state: TrainState, keep_last: int | None = None,
    ) -> None:
        self.job_id, self.storage, self.settings, self.callbacks, self.group, self.state = (
            job_id, storage, settings, callbacks, group, state
        )
        self.keep_last = keep_last
        self.workdir = settings.data_cache_dir / "jobs" / (job_id if group.is_main else f"{job_id}.rank{group.rank}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.tb_dir = self.workdir / "tensorboard"
        self.tb_uri = storage.job_uri(job_id, "tensorboard")
        self.uploader = BackgroundUploader(storage, settings.upload_deadline_s)
        self.saves = 0  # checkpoints written by this attempt
        self.last_tb_upload = time.monotonic()

    def abort_earlier_uploads(self) -> None:
        """Abort the multipart uploads an earlier attempt left open (a worker killed mid-upload):
        their parts are stored, and billed on AWS, until aborted."""
        try:
            aborted = self.storage.abort_incomplete_uploads(self.storage.job_uri(self.job_id))
        except ClientError as exc:  # e.g. no s3:AbortMultipartUpload permission: not worth failing the job
            logger.warning("job %s: could not abort earlier incomplete uploads: %s", self.job_id, public_message(exc))
            return
        for key in aborted:
            logger.info("job %s: aborted the incomplete upload of %s left by an earlier attempt", self.job_id, key)

    def checkpoints(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's loadable checkpoints as ``(uri, payload)``, newest first, each downloaded when asked for.

        An unreadable one (never expected: S3 writes are atomic) is logged and skipped.

        Raises:
            Exception: a transient fault (S3 unreachable): retry the job later rather than start it over.
        """
        for uri in checkpoint_uris(self.storage, self.job_id):
            path = self.workdir / "resume.pt"
            try:
                # Onto the CPU: load_state_dict copies weights and optimizer state to the model's device,
                # while the RNG and loader states must stay CPU tensors (numpy cannot read a CUDA one).
                payload = load_checkpoint(self.storage.download_file(uri, path), map_location="cpu")
            except Exception as exc:  # never expected (S3 writes are atomic), but an older one will do
                if classify(exc) is Fault.TRANSIENT:
                    raise  # S3 unreachable: retry the job later rather than start it over
                logger.exception("job %s: checkpoint %s unreadable; trying an older one", self.job_id, uri)
                continue
            finally:
                path.unlink(missing_ok=True)
            yield uri, payload

    def write_checkpoint(self, kind: CheckpointKind, snapshot: Snapshot) -> str:
        """Queue ``snapshot``'s write and upload as the checkpoint of ``kind`` at the state's step;
        return the URI it will have. ``on_checkpoint(uri, kind)`` is called once it is in S3.

        A newer ``step-*`` (or ``best.pt``) replaces one of its kind still waiting; ``final.pt`` is never replaced.
        """
        # A local file per save: `best.pt` may be saved again while its last upload still waits.
        self.saves += 1
        name = checkpoint_name(kind, self.state.step)
        path = self.workdir / "checkpoints" / f"{self.saves:06d}-{name}"
        uri = self.storage.job_uri(self.job_id, "checkpoints", name)
        self.uploader.submit_file(
            path, uri, on_done=lambda: self._checkpoint_uploaded(uri, kind),
            write=lambda: write_checkpoint(path, snapshot), coalesce=_coalesce_key(kind),
        )
        return uri

    def _checkpoint_uploaded(self, uri: str, kind: CheckpointKind) -> None:
        """Report ``uri``; then, with ``keep_last``, delete the step checkpoints a new step one makes stale."""
        self.callbacks.on_checkpoint(uri, kind)
        if self.keep_last is not None and kind is CheckpointKind.STEP:
            steps = checkpoint_uris(self.storage, self.job_id, frozenset({CheckpointKind.STEP}))
            for stale in stale_checkpoints(steps, self.keep_last):
                if delete_checkpoint(self.storage, stale):
                    self.callbacks.on_checkpoint_deleted(stale)

    def upload_tensorboard(self, writer: SummaryWriter | Any) -> None:
        """Queue an upload of the events written so far (rank 0)."""
        if not self.group.is_main:
            return
        writer.flush()
        self.uploader.submit_snapshot(self.tb_dir, self.tb_uri, key="tensorboard")
        self.last_tb_upload = time.monotonic()

    def upload_tensorboard_if_due(self, writer: SummaryWriter | Any) -> None:
        """:meth:`upload_tensorboard` when ``tensorboard_upload_interval_s`` has passed since the last."""
        if time.monotonic() - self.last_tb_upload >= self.settings.tensorboard_upload_interval_s:
            self.upload_tensorboard(writer)

    @in_stage("upload")
    def drain(self, *, stoppable: bool = True, max_wait_s: float | None = None) -> bool:
        """Wait for every upload; True once all are in S3.

        With ``stoppable``, a cancel, shutdown or lost lease while S3 is slow or down ends the
        wait with :class:`TrainingStopped` (a later attempt resumes from the newest complete
        checkpoint). With ``max_wait_s``, give up waiting after that many seconds (False).
        """
        if not self.group.is_main:
            return True  # only rank 0 uploads
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        while not self.uploader.drain(timeout_s=self.settings.cancel_poll_interval_s):
            reason: StopReason | None = self.callbacks.stop_requested() if stoppable else None
            if reason is not None:
                logger.warning("job %s: %s while uploads were pending; not waiting for them", self.job_id, reason.value)
                raise TrainingStopped(reason, self.state.step, self.state.runtime_s, None)
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("job %s: uploads still pending after %.0f s; not waiting longer", self.job_id, max_wait_s)
                return False
        return True

    def raise_if_failed(self) -> None:
        """Raise an earlier upload's (or checkpoint write's) failure now: no use training on when nothing more can be saved."""
        self.uploader.raise_if_failed()

    def close(self) -> None:
        """Stop the uploader (call :meth:`drain` first to keep what is queued)."""
        self.uploader.close()
