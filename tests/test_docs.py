"""The README's spec and settings reference is generated from the models and must be current."""

from __future__ import annotations

import json
import re

from tests.fixtures import REPO, example_spec
from trainq.docs import README, render


def test_readme_reference_is_current():
    text = README.read_text()
    assert render(text) == text, "README is stale: run `python -m trainq.docs`"


def test_readme_example_is_the_example_file():
    block = re.search(r"A full example.*?```json\n(.*?)```", README.read_text(), re.S).group(1)
    assert json.loads(block) == example_spec()
    assert (REPO / "examples" / "digits.json").read_text() == block


def test_every_example_spec_is_valid():
    from shared.spec import JobSpec

    for path in sorted((REPO / "examples").glob("*.json")):
        JobSpec.model_validate_json(path.read_text())


def test_readme_shows_the_export_line_make_up_prints(tmp_path):
    from trainq.stack import LocalStack, banner

    printed = banner(LocalStack(tmp_path, api_port=8000, workers=0), "tq_admin_…")
    export = next(line.strip() for line in printed.splitlines() if line.strip().startswith("export "))
    assert export in README.read_text()


def test_readme_documents_every_exit_status():
    from trainq.cli import ExitStatus

    text = README.read_text()
    table = text[text.index("Exit status, for scripts:"):]
    assert all(f"\n| {int(status)} |" in table for status in ExitStatus), [s for s in ExitStatus if f"\n| {int(s)} |" not in table]
