"""The bytes an owner's jobs hold in S3, measured on request.

Every artifact of a job — checkpoints, TensorBoard events, logs — is under its prefix
(:meth:`shared.storage.Storage.job_uri`), so an owner's figure is the sum of its jobs' listings.
Listing is exact at the moment it runs: a checkpoint that retention (``checkpoint.keep_last``)
deleted is no longer counted, and nothing is kept in Redis that could drift from S3. The work is
one ``ListObjectsV2`` per 1,000 objects of each job, bounded to the owner's newest
:data:`MAX_JOBS_MEASURED` jobs and run a few at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from shared.jobs import JobStore
from shared.schemas import OwnerStorage
from shared.storage import Storage

#: Jobs whose prefixes one measure lists at most (the owner's newest): bounds a request's work.
MAX_JOBS_MEASURED = 1000
#: Listings in flight at once (below the S3 client's 16 pooled connections).
_PARALLEL_LISTINGS = 8


def measure_owner_storage(store: JobStore, storage: Storage, owner: str, *, max_jobs: int = MAX_JOBS_MEASURED) -> OwnerStorage:
    """The objects and bytes under the prefixes of ``owner``'s newest ``max_jobs`` jobs.

    Raises:
        DatasetError: the bucket cannot be listed (missing, access denied), naming the prefix.
    """
    job_ids, total = store.owner_job_ids(owner, limit=max_jobs)
    with ThreadPoolExecutor(_PARALLEL_LISTINGS) as pool:
        listings = list(pool.map(lambda job_id: storage.list_objects(storage.job_uri(job_id)), job_ids))
    return OwnerStorage(
        owner=owner,
        bytes=sum(obj.size for listing in listings for obj in listing),
        objects=sum(len(listing) for listing in listings),
        jobs=len(job_ids),
        jobs_total=total,
    )
