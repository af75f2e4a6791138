"""What a spec may reach: the queues the operator configured and the S3 prefixes specs may read.

The same checks run twice: at submit (the API answers 422 naming the field) and in the worker
before anything is downloaded (a job recorded before the settings changed, or sent by other
means, fails at once as a job error). ``local://`` URIs are confined by ``DATA_ROOT`` instead
(:mod:`shared.paths`).

A queue name is a Redis key of the broker: a name that is one of kombu's own keys (``unacked``…)
turns that key into a list and makes every worker exit with ``WRONGTYPE`` (issue 7). Only names
the operator configured in ``QUEUES`` are accepted, and those are checked at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.exceptions import JobFailure
from shared.paths import key_problem, printable
from shared.spec import QUEUE_PATTERN, CsvDataset, JobSpec

if TYPE_CHECKING:
    from shared.settings import Settings

#: Keys of kombu's Redis transport (``Channel.unacked_key`` and friends) and of Celery's
#: control and event exchanges; a queue of that name would collide with them.
RESERVED_QUEUE_NAMES = frozenset({"unacked", "unacked_index", "unacked_mutex", "celeryev", "celery.pidbox", "reply.celery.pidbox"})
#: Prefixes of ``S3_BUCKET`` a spec may read when ``DATA_URIS_ALLOWED`` is unset.
DEFAULT_DATA_PREFIXES = ("datasets/", "tables/", "weights/")
_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<key>.*)$", re.S)


@dataclass(frozen=True)
class AccessProblem:
    """A spec field that names something this service does not allow.

    Attributes:
        loc: the field's JSON path in the spec, e.g. ``("dataset", "extra_uris", 1)``.
        value: what the spec gave there.
        message: why it is refused.
    """

    loc: tuple[str | int, ...]
    value: str
    message: str


def check_queue_name(name: str) -> None:
    """Raise ValueError when ``name`` cannot be a queue: not ``QUEUE_PATTERN``, or a broker's own key."""
    if not re.fullmatch(QUEUE_PATTERN, name) or name in RESERVED_QUEUE_NAMES or name.endswith(".pidbox"):
        raise ValueError(
            f"queue name {printable(name)!r} is not allowed: it must match {QUEUE_PATTERN} and not be one of "
            f"the broker's own keys ({', '.join(sorted(RESERVED_QUEUE_NAMES))}, *.pidbox)"
        )


def _split(uri: str) -> tuple[str, str] | None:
    match = _S3_URI.match(uri)
    return (match["bucket"], match["key"]) if match else None


def check_s3_prefix(uri: str) -> None:
    """Raise ValueError unless ``uri`` is ``s3://<bucket>/<prefix>`` with a plain relative prefix."""
    parts = _split(uri)
    key = parts[1] if parts else ""
    if parts is None or (key and key_problem(key.removesuffix("/")) is not None):
        raise ValueError(f"DATA_URIS_ALLOWED: {printable(uri)!r} is not s3://<bucket>/<prefix>/ with a plain relative prefix")


def allowed_data_prefixes(settings: Settings, owner: str | None = None) -> list[str]:
    """The S3 prefixes ``owner``'s specs may read: ``DATA_URIS_ALLOWED`` (or ``datasets/``,
    ``tables/`` and ``weights/`` of ``S3_BUCKET``) and the owner's own entries of
    ``DATA_URIS_ALLOWED_BY_OWNER``. Each ends with ``/`` (or is a whole bucket, ``s3://b/``)."""
    uris = settings.data_uris_allowed or [f"s3://{settings.s3_bucket}/{prefix}" for prefix in DEFAULT_DATA_PREFIXES]
    uris = [*uris, *settings.data_uris_allowed_by_owner.get(owner or "", [])]
    return [uri if uri.endswith("/") else f"{uri}/" for uri in uris]


def settings_for_owner(settings: Settings, owner: str | None) -> Settings:
    """``settings`` with ``DATA_URIS_ALLOWED`` set to what ``owner`` may read, and no per-owner
    entries: what a worker hands the training engine, which checks a spec without knowing whose it is."""
    return settings.model_copy(
        update={"data_uris_allowed": allowed_data_prefixes(settings, owner), "data_uris_allowed_by_owner": {}}
    )


def check_uri_allowed(uri: str, settings: Settings, owner: str | None = None) -> None:
    """Raise ValueError unless a spec may read ``uri``: a ``local://`` URI with a plain relative
    path, or an S3 URI under an allowed prefix (:func:`allowed_data_prefixes`) whose key is a
    plain relative path (see :func:`shared.paths.key_problem`).

    The one place that decides which data a spec reaches (``owner``'s prefixes included). A
    prefix is a folder: ``s3://b/data/`` allows ``s3://b/data``, ``s3://b/data/x.csv``, not
    ``s3://b/database/``. Another job's artifacts (``s3://<bucket>/<S3_PREFIX>/<job_id>/…``) are
    readable only when an allowed prefix covers them.
    """
    if uri.startswith("local://"):  # confined by DATA_ROOT on the worker; only its form is checked here
        problem = key_problem(uri[len("local://"):].removesuffix("/"))
        if problem is not None:
            raise ValueError(f"the path of {printable(uri)} {problem}")
        return
    parts = _split(uri)
    if parts is None:
        raise ValueError(f"{printable(uri)} is not an S3 URI")
    bucket, key = parts
    problem = key_problem(key.removesuffix("/")) if key else None
    if problem is not None:
        raise ValueError(f"the key of {printable(uri)} {problem}")
    allowed = allowed_data_prefixes(settings, owner)
    for prefix in allowed:
        allowed_bucket, allowed_key = _split(prefix)  # type: ignore[misc]
        if bucket == allowed_bucket and (key.startswith(allowed_key) or f"{key}/" == allowed_key):
            return
    raise ValueError(f"{printable(uri)} is not under a prefix this service may read ({', '.join(allowed)}; see DATA_URIS_ALLOWED)")


def priority_ceiling(settings: Settings, owner: str) -> int:
    """The highest spec ``priority`` ``owner`` may give: its ``PRIORITY_CEILING_BY_OWNER`` entry, else ``PRIORITY_CEILING``."""
    return settings.priority_ceiling_by_owner.get(owner, settings.priority_ceiling)


def priority_problems(spec: JobSpec, settings: Settings, owner: str) -> list[AccessProblem]:
    """``priority`` over ``owner``'s ceiling; ``preemptible: false`` below ``NON_PREEMPTIBLE_MIN_PRIORITY``."""
    problems = []
    ceiling = priority_ceiling(settings, owner)
    if spec.priority > ceiling:
        problems.append(AccessProblem(
            ("priority",), str(spec.priority),
            f"priority {spec.priority} is above {ceiling}, the highest owner {owner!r} may give (PRIORITY_CEILING"
            f"{'_BY_OWNER' if owner in settings.priority_ceiling_by_owner else ''})",
        ))
    if not spec.preemptible and spec.priority < settings.non_preemptible_min_priority:
        problems.append(AccessProblem(
            ("preemptible",), "false",
            f"preemptible: false needs priority {settings.non_preemptible_min_priority} or more "
            f"(NON_PREEMPTIBLE_MIN_PRIORITY); this spec has {spec.priority}",
        ))
    return problems


def spec_access_problems(spec: JobSpec, settings: Settings, owner: str | None = None) -> list[AccessProblem]:
    """Every field of ``spec`` that names a queue or a URI the settings do not allow ``owner``, and, with an
    ``owner`` (the API's check at submit), a priority or ``preemptible`` it may not ask for."""
    problems = [] if owner is None else priority_problems(spec, settings, owner)
    queue = spec.queue or settings.default_queue
    if queue not in settings.queues:
        problems.append(AccessProblem(("queue",), queue, f"queue {queue!r} is not one of the configured queues {settings.queues} (QUEUES)"))
    dataset = spec.dataset
    uris: list[tuple[tuple[str | int, ...], str | None]] = [(("dataset", "uri"), dataset.uri)]
    if not isinstance(dataset, CsvDataset):
        uris += [(("dataset", "extra_uris", i), uri) for i, uri in enumerate(dataset.extra_uris)]
    uris += [(("dataset", "val_uri"), dataset.val_uri), (("model", "weights_uri"), spec.model.weights_uri)]
    for loc, uri in uris:
        if uri is None:
            continue
        try:
            check_uri_allowed(uri, settings, owner)
        except ValueError as exc:
            problems.append(AccessProblem(loc, uri, str(exc)))
    return problems


def check_spec_access(spec: JobSpec, settings: Settings) -> None:
    """The worker's check before it reads anything.

    Raises:
        JobFailure: naming each refused field, e.g. ``dataset.uri: s3://other/x is not under…``;
            its ``field`` is the first one (a dry run's ``loc``).
    """
    problems = spec_access_problems(spec, settings)
    if problems:
        raise JobFailure(
            "; ".join(f"{_dotted(problem.loc)}: {problem.message}" for problem in problems),
            field=".".join(str(part) for part in problems[0].loc),
        )


def _dotted(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
