"""Checkpoint retention (``checkpoint.keep_last``): which step checkpoints a newer one makes stale.

Runs on the upload thread right after a step checkpoint is complete in S3, so a checkpoint is
deleted only once ``keep_last`` newer ones are safely stored; ``best.pt`` and ``final.pt`` are
never deleted. A resume always reads the newest checkpoint, which is never stale.
"""

from __future__ import annotations

import logging

from shared.storage import Storage

logger = logging.getLogger(__name__)


def stale_checkpoints(steps_newest_first: list[str], keep_last: int) -> list[str]:
    """The step checkpoints beyond the newest ``keep_last`` (the caller passes only ``step-N.pt``
    URIs, newest first: ``final.pt`` and ``best.pt`` are never stale)."""
    return steps_newest_first[keep_last:]


def delete_checkpoint(storage: Storage, uri: str) -> bool:
    """Delete ``uri``; True once done. A failure is logged and left for the next checkpoint's
    pass (retention never fails a job)."""
    try:
        storage.delete(uri)
    except Exception as exc:
        logger.warning("checkpoint %s not deleted (keep_last): %s; the next checkpoint retries", uri, exc)
        return False
    logger.info("deleted %s (checkpoint.keep_last)", uri)
    return True
