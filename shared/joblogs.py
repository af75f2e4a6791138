"""Where each attempt's training log lives in S3, and how its last upload is marked.

The worker writes (:mod:`worker.joblog`), the API reads (:mod:`api.routes.logs`).
"""

from __future__ import annotations

from shared.storage import Storage

#: Object metadata key (``x-amz-meta-complete``) set to ``true`` on an attempt's last upload.
COMPLETE_METADATA = "complete"


def log_uri(storage: Storage, job_id: str, attempt: int) -> str:
    """``s3://<bucket>/<prefix>/<job_id>/logs/attempt-<attempt>.log`` (``attempt`` counts from 1)."""
    return storage.job_uri(job_id, "logs", f"attempt-{attempt}.log")
