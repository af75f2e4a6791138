"""Local paths for names that come from outside: S3 keys and ``local://`` paths.

Every place where a name from a spec or a bucket becomes a local path goes through this module;
nothing else joins such names onto a folder. Two kinds of root:

* **A cache folder** (S3 downloads): :func:`cache_path` maps a relative key onto it, segment by
  segment, refusing keys that are not plain relative paths (a leading ``/``, empty, ``.`` or ``..``
  segments, backslashes, NUL and other control characters) and shortening segments too long for
  a file name. The result is always inside the folder.
* **DATA_ROOT** (``local://`` URIs): :func:`resolve_inside` resolves a name (symlinks included)
  and :func:`check_tree_inside` every entry below a folder; whatever leaves the root, and
  whatever does not exist, gets the same error, so an error never tells which.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from shared.exceptions import DatasetError

#: Longest file name written, in UTF-8 bytes. File systems allow 255 (ext4, XFS, APFS, NTFS);
#: the rest is room for the ``.<pid>.part`` suffix of a download in progress.
MAX_NAME_BYTES = 200
#: Hex digits of SHA-256 in a shortened name (64 bits: no accidental collision in one folder).
_HASH_CHARS = 16
#: Longest extension kept on a shortened name (``.png``, ``.jpeg``, ``.tiff``…), in bytes.
_MAX_EXTENSION_BYTES = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Hidden file in a download folder: local name → original relative key, for names shortened.
NAMES_FILE = ".names.json"


def printable(text: str) -> str:
    """``text`` with control characters (ESC, CR, LF, NUL…) shown as ``\\xNN``: safe in errors and logs."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match[0]):02x}", text)


def key_problem(name: str) -> str | None:
    """Why ``name`` is not a plain relative path of ``/``-separated segments, or None if it is.

    Refused: empty; a leading ``/``; an empty (``//``), ``.`` or ``..`` segment; a backslash
    (a separator on Windows, and a way around ``/`` checks); NUL or another control character.
    """
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "starts with '/'"
    if "\\" in name:
        return "contains a backslash"
    if _CONTROL.search(name):
        return "contains a control character"
    segments = name.split("/")
    if "" in segments:
        return "has an empty segment ('//')"
    if "." in segments or ".." in segments:
        return "has a '.' or '..' segment"
    return None


def check_key(name: str, *, source: str) -> list[str]:
    """The segments of the relative key ``name``.

    Raises:
        DatasetError: ``name`` is not a plain relative path (see :func:`key_problem`); the
            message names ``source`` (the object's S3 URI), with control characters escaped.
    """
    problem = key_problem(name)
    if problem is not None:
        raise DatasetError(
            f"refused object {printable(source)}: its key (below the prefix) '{printable(name)}' {problem}; "
            "keys must be relative paths without '.', '..' or empty segments, backslashes or control characters"
        )
    return name.split("/")


def local_name(segment: str) -> str:
    """``segment`` as a file name of at most :data:`MAX_NAME_BYTES` bytes.

    Short names are kept as they are. A longer one (S3 keys reach 1,024 bytes) becomes its
    first bytes, ``~``, 16 hex digits of its SHA-256 and its extension (so ``….png`` is still a
    PNG to ``ImageFolder``); distinct names stay distinct.
    """
    encoded = segment.encode()
    if len(encoded) <= MAX_NAME_BYTES:
        return segment
    digest = hashlib.sha256(encoded).hexdigest()[:_HASH_CHARS]
    stem, dot, extension = segment.rpartition(".")
    suffix = f".{extension}" if dot and stem and len(extension.encode()) < _MAX_EXTENSION_BYTES else ""
    room = MAX_NAME_BYTES - len(f"~{digest}{suffix}".encode())
    head = encoded[:room].decode("utf-8", errors="ignore")  # never half a character
    return f"{head}~{digest}{suffix}"


def local_relative(key: str, *, source: str) -> str:
    """The relative local path (``/``-separated) of the relative key ``key``: each segment through
    :func:`local_name`.

    Raises:
        DatasetError: ``key`` is not a plain relative path (naming ``source``, the object's URI).
    """
    return "/".join(local_name(segment) for segment in check_key(key, source=source))


def cache_path(root: Path, key: str, *, source: str) -> Path:
    """Where the object with relative key ``key`` is stored under ``root``: always inside it.

    Each segment goes through :func:`local_name`, so ``a/b.png`` is ``root/a/b.png`` and a
    segment over 200 bytes is shortened.

    Raises:
        DatasetError: ``key`` is not a plain relative path (naming ``source``, the object's URI).
    """
    path = root / local_relative(key, source=source)
    if not path.is_relative_to(root):  # cannot happen after check_key; kept as the last line of defence
        raise DatasetError(f"refused object {printable(source)}: it would leave the download folder")
    return path


def write_names(folder: Path, names: dict[str, str]) -> None:
    """Remember, in ``folder``, the original key of every local path that :func:`local_name` shortened."""
    if names:
        (folder / NAMES_FILE).write_text(json.dumps(names))


def read_names(folder: Path) -> dict[str, str]:
    """Local relative path → original relative key, for the shortened names in ``folder`` (else empty)."""
    try:
        return json.loads((folder / NAMES_FILE).read_text())
    except FileNotFoundError:
        return {}


# -- DATA_ROOT -------------------------------------------------------------------------------------


def _not_found(source: str) -> DatasetError:
    # One text for "missing" and "outside the root": an error must not tell which files exist
    # elsewhere on the worker.
    return DatasetError(f"{printable(source)}: no such file or folder under DATA_ROOT")


def resolve_inside(root: Path, name: str, *, source: str) -> Path:
    """The real path of ``name`` (relative, symlinks resolved) inside ``root``.

    Raises:
        DatasetError: ``name`` is not a plain relative path, or it resolves outside ``root``, or
            nothing is there — the last two with the same message, naming ``source``.
    """
    real_root = root.resolve()
    problem = key_problem(name.rstrip("/"))
    if problem is not None:
        raise DatasetError(f"{printable(source)}: the path {problem}")
    path = (real_root / name).resolve()
    if not path.is_relative_to(real_root) or not path.exists():
        raise _not_found(source)
    return path


def check_tree_inside(folder: Path, root: Path, *, source: str) -> None:
    """Check that every non-hidden entry below ``folder`` really lies inside ``root``.

    Symlinked files and folders are resolved; a link out of ``root``, a dangling link and a link
    to a folder that contains it (a loop) are refused. Only symlinks cost a ``realpath``, so a
    tree without links is checked at the cost of listing it. Hidden entries (a part starting
    with ``.``) are never read and are not checked.

    Raises:
        DatasetError: naming ``source/<relative path>``; a link out and a missing target read
            the same.
    """
    real_root = os.path.realpath(root)
    pending = [(os.path.realpath(folder), "")]
    while pending:
        real_dir, relative = pending.pop()
        with os.scandir(real_dir) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{relative}{entry.name}"
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not _within(real, real_root) or not os.path.exists(real):
                        raise _not_found(f"{source.rstrip('/')}/{name}")
                    is_dir = os.path.isdir(real)
                    if is_dir and _within(real_dir, real):
                        raise DatasetError(f"{printable(source.rstrip('/'))}/{printable(name)}: a symlink loop")
                else:  # listed, so it exists, and its folder is real: no system call
                    real, is_dir = entry.path, entry.is_dir(follow_symlinks=False)
                if is_dir:
                    pending.append((real, f"{name}/"))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")
