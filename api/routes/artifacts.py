"""``GET /jobs/{id}/artifacts``: every object a job wrote, with presigned download URLs."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from api.deps import SettingsDep, StorageDep, VisibleJobDep
from shared.schemas import ArtifactFile, ArtifactList, ErrorDetail
from shared.storage import Storage

router = APIRouter(prefix="/jobs", tags=["artifacts"])


class ArtifactsQuery(BaseModel):
    """``GET /jobs/{id}/artifacts`` takes no parameters; any is refused (422)."""

    model_config = ConfigDict(extra="forbid")


def get_presigner(request: Request) -> Storage:
    """S3 on the endpoint clients reach (``S3_PUBLIC_ENDPOINT_URL``), used only to sign URLs."""
    return request.app.state.presigner


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses={404: {"model": ErrorDetail}})
def read_artifacts(
    job: VisibleJobDep,
    storage: StorageDep,
    settings: SettingsDep,
    request: Request,
    _: Annotated[ArtifactsQuery, Query()],
) -> ArtifactList:
    """Checkpoints, TensorBoard event files and logs of the job, each with a URL that downloads it
    without credentials until `expires_at` (`ARTIFACT_URL_EXPIRY_S`)."""
    prefix = storage.job_uri(job.id) + "/"
    expires_s = settings.artifact_url_expiry_s
    presigner = get_presigner(request)
    signed_at = time.time()  # every URL is valid at least until signed_at + expires_s
    files = []
    for obj in storage.list_objects(prefix):
        uri = f"s3://{storage.bucket}/{obj.key}"
        files.append(
            ArtifactFile(
                path=uri[len(prefix):], uri=uri, size_bytes=obj.size, last_modified=obj.last_modified,
                url=presigner.presigned_url(uri, expires_s),
            )
        )
    return ArtifactList(job_id=job.id, prefix=prefix, expires_in_s=expires_s, expires_at=signed_at + expires_s, files=files)
