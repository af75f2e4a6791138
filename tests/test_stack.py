"""The local stack (`make up`): the sample data is in S3 before the API answers (issue 8 item 7)."""

from __future__ import annotations

from pathlib import Path

import httpx

from shared.storage import Storage
from trainq.stack import DEMO_DATASET_URI, LocalStack


def test_the_data_is_seeded_before_the_api_serves(tmp_path: Path):
    # `/healthz` used to answer before the digits were uploaded, so the README's first curl right
    # after start-up failed with "dataset prefix … is empty".
    stack = LocalStack(tmp_path, workers=0, isolated=True)
    seen: dict[str, bool] = {}

    def seed() -> None:
        try:
            httpx.get(f"{stack.api_url}/healthz", timeout=1)
            seen["api_up_while_seeding"] = True
        except httpx.TransportError:
            seen["api_up_while_seeding"] = False
        stack.seed_digits()

    stack.start(before_serving=seed)
    try:
        assert seen == {"api_up_while_seeding": False}
        assert httpx.get(f"{stack.api_url}/healthz", timeout=5).status_code == 200
        assert len(Storage(stack.settings).list_objects(DEMO_DATASET_URI)) == 1797
    finally:
        stack.stop()
