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
