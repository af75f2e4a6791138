"""``GET /storage``: the bytes an owner's jobs hold in S3 (checkpoints, TensorBoard events, logs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import PrincipalDep, StorageDep, StoreDep
from shared.owner_storage import MAX_JOBS_MEASURED, measure_owner_storage
from shared.schemas import ErrorDetail, OwnerStorage

router = APIRouter(tags=["storage"])


class StorageQuery(BaseModel):
    """``GET /storage``'s only parameter is ``owner``; any other is refused (422)."""

    model_config = ConfigDict(extra="forbid")

    owner: str | None = Field(None, min_length=1, max_length=64, description="Whose storage; default yours. Another owner's: admins only.")


@router.get(
    "/storage",
    response_model=OwnerStorage,
    responses={403: {"model": ErrorDetail, "description": "Another owner's, and not an admin."}},
    description=f"Bytes and objects in S3 under your jobs' prefixes (checkpoints, TensorBoard events, logs), listed now "
    f"over your newest {MAX_JOBS_MEASURED:,} jobs: what `checkpoint.keep_last` deleted is no longer counted.",
)
def read_storage(store: StoreDep, storage: StorageDep, principal: PrincipalDep, query: Annotated[StorageQuery, Query()]) -> OwnerStorage:
    """The bytes an owner's jobs hold in S3; yours, or ``owner``'s for an admin (else 403)."""
    owner = query.owner or principal.owner
    if not principal.can_see(owner):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"only an admin may read another owner's storage ({owner!r})")
    return measure_owner_storage(store, storage, owner)
