"""Which queue names and S3 prefixes this service accepts: checked in its settings and at submit.

A queue name is a Redis key of the broker: a name that is one of kombu's own keys (``unacked``…)
turns that key into a list and makes every worker exit with ``WRONGTYPE`` (issue 7).
"""

from __future__ import annotations

import re

from shared.paths import key_problem, printable
from shared.spec import QUEUE_PATTERN

#: Keys of kombu's Redis transport (``Channel.unacked_key`` and friends) and of Celery's
#: control and event exchanges; a queue of that name would collide with them.
RESERVED_QUEUE_NAMES = frozenset({"unacked", "unacked_index", "unacked_mutex", "celeryev", "celery.pidbox", "reply.celery.pidbox"})
LOCAL_SCHEME = "local://"
_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<key>.*)$", re.S)


def check_queue_name(name: str) -> None:
    """Raise ValueError when ``name`` cannot be a queue: not ``QUEUE_PATTERN``, or a broker's own key."""
    if not re.fullmatch(QUEUE_PATTERN, name) or name in RESERVED_QUEUE_NAMES or name.endswith(".pidbox"):
        raise ValueError(
            f"queue name {printable(name)!r} is not allowed: it must match {QUEUE_PATTERN} and not be one of "
            f"the broker's own keys ({', '.join(sorted(RESERVED_QUEUE_NAMES))}, *.pidbox)"
        )


def split_s3_uri(uri: str) -> tuple[str, str] | None:
    """``(bucket, key)`` of an ``s3://`` URI (the key may be empty); None for anything else."""
    match = _S3_URI.match(uri)
    return (match["bucket"], match["key"]) if match else None


def check_s3_prefix(uri: str) -> None:
    """Raise ValueError unless ``uri`` is ``s3://<bucket>/<prefix>`` or ``local://<folder>`` with a
    plain relative prefix (``local://`` alone: all of ``DATA_ROOT``)."""
    if uri.startswith(LOCAL_SCHEME):
        path = uri[len(LOCAL_SCHEME):].removesuffix("/")
        if path and key_problem(path) is not None:
            raise ValueError(f"LOCAL_PATHS_ALLOWED: {printable(uri)!r} is not local://<folder>/ with a plain relative path")
        return
    parts = split_s3_uri(uri)
    key = parts[1] if parts else ""
    if parts is None or (key and key_problem(key.removesuffix("/")) is not None):
        raise ValueError(f"DATA_URIS_ALLOWED: {printable(uri)!r} is not s3://<bucket>/<prefix>/ with a plain relative prefix")
