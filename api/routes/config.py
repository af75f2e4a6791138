"""``GET /config/tensorboard``: where TensorBoard finds the event files (``trainq tensorboard``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import PrincipalDep, SettingsDep
from api.routes.workers import NoQuery
from shared.schemas import TensorBoardConfig

router = APIRouter(prefix="/config", tags=["config"])


@router.get("/tensorboard", response_model=TensorBoardConfig)
def read_tensorboard_config(settings: SettingsDep, _principal: PrincipalDep, _: Annotated[NoQuery, Query()]) -> TensorBoardConfig:
    """The bucket prefix holding every job's TensorBoard run and the S3 endpoint to read it from.

    Credentials are not given out: TensorBoard uses the reader's own (`AWS_ACCESS_KEY_ID`…)."""
    prefix = settings.s3_prefix.strip("/")
    return TensorBoardConfig(
        logdir=f"s3://{settings.s3_bucket}/{prefix}/" if prefix else f"s3://{settings.s3_bucket}/",
        s3_endpoint=settings.s3_public_endpoint_url or settings.s3_endpoint_url,
        region=settings.aws_default_region,
    )
