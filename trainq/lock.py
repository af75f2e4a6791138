"""Lock files for the container images: every package pinned, with hashes, from pyproject.toml.

``deploy/requirements/worker.lock``
    The worker image (``Dockerfile.gpu``): all of trainq's dependencies. torch's Linux x86_64
    wheels on PyPI are CUDA builds whose CUDA libraries come as pinned ``nvidia-*`` /
    ``cuda-toolkit`` wheels, so the lock fixes the CUDA version too (torch 2.14 → CUDA 13.0).
``deploy/requirements/api.lock``
    The API image (``deploy/Dockerfile.api``): only :data:`API_DEPENDENCIES`, no torch.
``deploy/requirements/build.lock``
    ``[build-system].requires`` (setuptools): what builds trainq's own wheel in both images.
``deploy/requirements/pins.txt``
    Constraints for both: torch and torchvision at the versions the test suite runs with.

Both are resolved for :data:`TARGET_PYTHON` on :data:`TARGET_PLATFORM` (the images'), whatever
machine runs this. Each lock's first lines record a SHA-256 of its inputs (the pyproject
requirements it was made from, ``pins.txt`` and the target), so a stale lock is caught offline::

    python -m trainq.lock           # regenerate (needs PyPI and uv: `pip install -e '.[dev]'`)
    python -m trainq.lock --check   # offline: are the locks in sync with pyproject.toml?
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO / "deploy" / "requirements"
PINS = LOCK_DIR / "pins.txt"
#: The images' CPython (minor) and platform. 3.11 is what the test suite runs on.
TARGET_PYTHON = "3.11"
TARGET_PLATFORM = "x86_64-manylinux_2_28"
#: What the API process imports (``api/``, ``shared/``): no torch, no torchvision, no tensorboard.
#: tests/deploy/test_deploy.py imports the API with only these packages' locked closure allowed.
API_DEPENDENCIES = ("fastapi", "uvicorn", "pydantic", "pydantic-settings", "celery", "redis", "boto3")
_INPUTS_LINE = re.compile(r"^# inputs-sha256: ([0-9a-f]{64})$", re.M)
_PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s\\;]+)", re.M)


@dataclass(frozen=True)
class Lock:
    """One lock file and the pyproject requirements it is made from."""

    name: str
    requirements: tuple[str, ...]

    @property
    def path(self) -> Path:
        """``deploy/requirements/<name>.lock``."""
        return LOCK_DIR / f"{self.name}.lock"

    def inputs_digest(self) -> str:
        """SHA-256 (hex) of everything the lock is resolved from; changes when any input does."""
        text = "\n".join([*self.requirements, PINS.read_text(), TARGET_PYTHON, TARGET_PLATFORM])
        return hashlib.sha256(text.encode()).hexdigest()


def project_requirements(pyproject: Path = REPO / "pyproject.toml", table: str = "project") -> list[str]:
    """``[project].dependencies`` (or, with ``table="build-system"``, ``[build-system].requires``)."""
    data = tomllib.loads(pyproject.read_text())
    return list(data["build-system"]["requires"] if table == "build-system" else data["project"]["dependencies"])


def locks(pyproject: Path = REPO / "pyproject.toml") -> list[Lock]:
    """The image locks.

    Raises:
        KeyError: a name in :data:`API_DEPENDENCIES` is not a dependency in pyproject.toml.
    """
    requirements = project_requirements(pyproject)
    by_name = {canonicalize_name(Requirement(line).name): line for line in requirements}
    api = []
    for name in API_DEPENDENCIES:
        if canonicalize_name(name) not in by_name:
            raise KeyError(f"API dependency {name!r} is not in [project].dependencies of {pyproject}")
        api.append(by_name[canonicalize_name(name)])
    build = tuple(project_requirements(pyproject, "build-system"))
    return [Lock("worker", tuple(requirements)), Lock("api", tuple(api)), Lock("build", build)]


def pinned(lock_text: str) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line in a lock file."""
    return {canonicalize_name(m.group(1)): m.group(3) for m in _PIN_LINE.finditer(lock_text)}


def check(lock: Lock) -> list[str]:
    """Problems that make ``lock`` stale, as messages naming the file (empty: in sync). Offline."""
    if not lock.path.exists():
        return [f"{lock.path.relative_to(REPO)}: missing; run `python -m trainq.lock`"]
    text = lock.path.read_text()
    problems = []
    recorded = _INPUTS_LINE.search(text)
    if recorded is None or recorded.group(1) != lock.inputs_digest():
        problems.append(
            f"{lock.path.relative_to(REPO)}: made from other inputs than pyproject.toml's dependencies and "
            f"{PINS.relative_to(REPO)} now hold; run `python -m trainq.lock`"
        )
    pins = pinned(text)
    for line in lock.requirements:
        requirement = Requirement(line)
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{lock.path.relative_to(REPO)}: {requirement.name} is not pinned")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{lock.path.relative_to(REPO)}: {requirement.name}=={version} does not satisfy {line!r}")
    return problems


def generate(lock: Lock, uv: str) -> None:
    """Resolve ``lock`` with ``uv pip compile`` against PyPI and write it.

    Raises:
        subprocess.CalledProcessError: uv failed (no network, no solution).
    """
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{lock.name}.in"
        source.write_text("\n".join(lock.requirements) + "\n")
        out = Path(tmp) / f"{lock.name}.lock"
        subprocess.run(
            [uv, "pip", "compile", str(source), "--constraint", str(PINS), "--output-file", str(out),
             "--python-version", TARGET_PYTHON, "--python-platform", TARGET_PLATFORM,
             "--generate-hashes", "--no-header", "--annotation-style", "line",
             "--index-url", "https://pypi.org/simple", "--quiet"],
            check=True,
        )
        body = out.read_text().replace(str(source), f"{lock.name}.in").replace(str(PINS), "pins.txt")
    header = (
        f"# {lock.path.relative_to(REPO)}: generated by `python -m trainq.lock` (uv pip compile) from\n"
        f"# pyproject.toml's dependencies and deploy/requirements/pins.txt, for CPython {TARGET_PYTHON} on\n"
        f"# {TARGET_PLATFORM}. Do not edit; `python -m trainq.lock --check` tells when it is stale.\n"
        f"# inputs-sha256: {lock.inputs_digest()}\n"
    )
    lock.path.write_text(header + body)


def main(argv: list[str] | None = None) -> int:
    """``python -m trainq.lock [--check]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the locks are in sync (offline)")
    args = parser.parse_args(argv)
    if args.check:
        problems = [problem for lock in locks() for problem in check(lock)]
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(uv).exists():
        print("error: uv not found; `pip install -e '.[dev]'` installs it", file=sys.stderr)
        return 1
    for lock in locks():
        generate(lock, uv)
        print(f"wrote {lock.path.relative_to(REPO)} ({len(pinned(lock.path.read_text()))} packages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
