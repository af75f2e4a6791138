"""The local stack (`make up`): the sample data is in S3 before the API answers (issue 8 item 7)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from shared.storage import Storage
from tests.fixtures import REPO
from trainq.stack import DEMO_DATASET_URI, LocalStack, banner


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


def test_the_banner_exports_what_the_cli_reads(tmp_path: Path):
    # A new user was told `export TOKEN=…` while the CLI reads TRAINQ_TOKEN, and every example
    # said localhost:8000 whatever port the stack was on (issue 20 items 1-2).
    stack = LocalStack(tmp_path, api_port=8001, workers=0)
    on = banner(stack, "tq_admin_abc")
    assert "  export TRAINQ_URL=http://127.0.0.1:8001 TRAINQ_TOKEN=tq_admin_abc\n" in on
    assert "curl -X POST $TRAINQ_URL/jobs -H \"Authorization: Bearer $TRAINQ_TOKEN\"" in on
    assert "trainq token create --owner NAME" in on and "export TOKEN=" not in on
    off = banner(stack, None)
    assert "  export TRAINQ_URL=http://127.0.0.1:8001\n" in off and "TRAINQ_TOKEN" not in off and "auth: OFF" in off


def test_make_up_takes_a_port(tmp_path: Path):
    dry = subprocess.run(["make", "-n", "up", "PORT=8001", f"VENV={tmp_path}/venv"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "-m trainq.stack --port 8001" in dry.stdout


def test_a_taken_port_says_how_to_pick_another(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"port {port} is in use.*`make up PORT={port + 1}` or `trainq up --port {port + 1}`"):
            LocalStack(tmp_path, api_port=port, workers=0).start()
