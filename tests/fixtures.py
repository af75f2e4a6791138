"""Tiny deterministic specs and data sets for the tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DIGITS_URI = "s3://trainq/datasets/digits/"


def example_spec() -> dict[str, Any]:
    """The README's example spec (``examples/digits.json``) as a dict."""
    return json.loads((REPO / "examples" / "digits.json").read_text())


def fast_digits_spec(**overrides: Any) -> dict[str, Any]:
    """The digits spec shortened to 2 epochs of batch 64 (23 steps each), with DataLoader workers."""
    spec = copy.deepcopy(example_spec())
    spec.update(name="test-digits", epochs=2, batch_size=64, num_workers=2)
    spec.update(overrides)
    return spec


def with_dataset(spec: dict[str, Any], **dataset: Any) -> dict[str, Any]:
    """A copy of ``spec`` with dataset fields replaced."""
    out = copy.deepcopy(spec)
    out["dataset"].update(dataset)
    return out
