"""Protections that already hold, pinned (see SECURITY.md): checkpoints load with weights_only, the
code base has no eval/exec/shell/pickle, Celery takes JSON only, and no spec list is unbounded."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from shared.exceptions import JobFailure
from shared.queue import make_celery
from shared.settings import Settings
from shared.spec import JobSpec
from tests.fixtures import REPO
from worker.training.checkpoint import load_checkpoint
from worker.training.models import load_initial_weights

SOURCE_DIRS = ("api", "shared", "worker", "trainq", "bench")


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    with pytest.raises(JobFailure, match="weights_only"):
        load_initial_weights(nn.Linear(1, 1), path, "s3://trainq/evil.pt")
    assert not marker.exists()


_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_ATTRIBUTES = {("pickle", "load"), ("pickle", "loads"), ("os", "system"), ("os", "popen"),
                         ("marshal", "loads"), ("yaml", "load"), ("dill", "load"), ("dill", "loads")}


def _problems(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        where = f"{path}:{node.lineno}"
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FORBIDDEN_CALLS:
            found.append(f"{where}: {func.id}()")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in _FORBIDDEN_ATTRIBUTES:
                found.append(f"{where}: {func.value.id}.{func.attr}()")
            if (func.value.id, func.attr) == ("torch", "load"):
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not weights_only or not (isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                found.append(f"{where}: shell=")
    return found


def test_no_eval_exec_shell_or_pickle_in_the_code_base():
    files = [path for folder in SOURCE_DIRS for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = [problem for path in files for problem in _problems(path)]
    assert problems == []


def test_the_scan_finds_what_it_looks_for(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, pickle, subprocess, torch\neval('1')\npickle.loads(b'')\nos.system('x')\n"
                   "subprocess.run('x', shell=True)\ntorch.load('f')\ntorch.load('f', weights_only=False)\n")
    assert len(_problems(bad)) == 6


def test_celery_accepts_json_only():
    from worker.celery_app import app as worker_app

    for app in (make_celery(Settings()), worker_app):
        assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"


def _unbounded(schema: dict, path: str = "") -> list[str]:
    found = []
    if isinstance(schema, dict):
        if schema.get("type") == "array" and "maxItems" not in schema:
            found.append(path or "(root)")
        if schema.get("type") == "string" and not {"maxLength", "enum", "const", "pattern"} & set(schema):
            found.append(path or "(root)")
        for key, value in schema.items():
            found += _unbounded(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found += _unbounded(value, f"{path}/{index}")
    return found


def test_every_list_and_string_in_the_spec_is_bounded():
    schema = JobSpec.model_json_schema()
    assert _unbounded(schema) == []
    assert JobSpec.model_fields["epochs"].metadata  # epochs ≤ 100,000; MAX_RUNTIME_S bounds the time
