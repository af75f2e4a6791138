"""What a spec may reach: the queues the operator configured and the S3 prefixes specs may read.

The same checks run twice: at submit (the API answers 422 naming the field) and in the worker
before anything is downloaded (a job recorded before the settings changed, or sent by other
means, fails at once as a job error). ``local://`` URIs are checked the same way against
``LOCAL_PATHS_ALLOWED`` and an owner's own ``local://`` entries, and the worker confines them to
``DATA_ROOT`` (:mod:`shared.paths`).

Only queue names the operator configured in ``QUEUES`` are accepted, and those are checked at
start-up (:mod:`shared.names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.exceptions import JobFailure
from shared.names import LOCAL_SCHEME, split_s3_uri
from shared.paths import key_problem, printable
from shared.spec import MAX_PRIORITY, JobSpec

if TYPE_CHECKING:
    from shared.settings import Settings

#: Prefixes of ``S3_BUCKET`` a spec may read when ``DATA_URIS_ALLOWED`` is unset.
DEFAULT_DATA_PREFIXES = ("datasets/", "tables/", "weights/")


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


def allowed_data_prefixes(settings: Settings, owner: str | None = None) -> list[str]:
    """The S3 prefixes ``owner``'s specs may read: ``DATA_URIS_ALLOWED`` (or ``datasets/``,
    ``tables/`` and ``weights/`` of ``S3_BUCKET``) and the owner's own entries of
    ``DATA_URIS_ALLOWED_BY_OWNER``. Each ends with ``/`` (or is a whole bucket, ``s3://b/``)."""
    uris = settings.data_uris_allowed or [f"s3://{settings.s3_bucket}/{prefix}" for prefix in DEFAULT_DATA_PREFIXES]
    uris = [*uris, *(uri for uri in settings.data_uris_allowed_by_owner.get(owner or "", []) if not uri.startswith(LOCAL_SCHEME))]
    return [uri if uri.endswith("/") else f"{uri}/" for uri in uris]


def allowed_local_prefixes(settings: Settings, owner: str | None = None) -> list[str]:
    """The ``local://`` folders ``owner``'s specs may read: ``LOCAL_PATHS_ALLOWED`` (all of
    ``DATA_ROOT`` by default) and the owner's ``local://`` entries of ``DATA_URIS_ALLOWED_BY_OWNER``."""
    own = [uri for uri in settings.data_uris_allowed_by_owner.get(owner or "", []) if uri.startswith(LOCAL_SCHEME)]
    return [uri if uri.endswith("/") else f"{uri}/" for uri in [*settings.local_paths_allowed, *own]]


def settings_for_owner(settings: Settings, owner: str | None) -> Settings:
    """``settings`` with ``DATA_URIS_ALLOWED`` set to what ``owner`` may read, and no per-owner
    entries: what a worker hands the training engine, which checks a spec without knowing whose it is."""
    return settings.model_copy(
        update={"data_uris_allowed": allowed_data_prefixes(settings, owner),
                "local_paths_allowed": allowed_local_prefixes(settings, owner), "data_uris_allowed_by_owner": {}}
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
    if uri.startswith(LOCAL_SCHEME):  # the worker also confines it to DATA_ROOT, symlinks resolved
        path = uri[len(LOCAL_SCHEME):].removesuffix("/")
        problem = key_problem(path)
        if problem is not None:
            raise ValueError(f"the path of {printable(uri)} {problem}")
        local = allowed_local_prefixes(settings, owner)
        if not any(prefix == LOCAL_SCHEME or f"{path}/".startswith(prefix[len(LOCAL_SCHEME):]) for prefix in local):
            raise ValueError(f"{printable(uri)} is not under a folder this service may read ({', '.join(local) or 'none'}; "
                             "see LOCAL_PATHS_ALLOWED)")
        return
    parts = split_s3_uri(uri)
    if parts is None:
        raise ValueError(f"{printable(uri)} is not an S3 URI")
    bucket, key = parts
    problem = key_problem(key.removesuffix("/")) if key else None
    if problem is not None:
        raise ValueError(f"the key of {printable(uri)} {problem}")
    allowed = allowed_data_prefixes(settings, owner)
    for prefix in allowed:
        allowed_bucket, allowed_key = split_s3_uri(prefix)  # type: ignore[misc]
        if bucket == allowed_bucket and (key.startswith(allowed_key) or f"{key}/" == allowed_key):
            return
    raise ValueError(f"{printable(uri)} is not under a prefix this service may read ({', '.join(allowed)}; see DATA_URIS_ALLOWED)")


def priority_ceiling(settings: Settings, owner: str, *, admin: bool = False) -> int:
    """The highest spec ``priority`` ``owner`` may give: its ``PRIORITY_CEILING_BY_OWNER`` entry, else
    ``PRIORITY_CEILING`` (an admin token: 100, so the top range and ``preemptible: false`` are reachable)."""
    return settings.priority_ceiling_by_owner.get(owner, MAX_PRIORITY if admin else settings.priority_ceiling)


def priority_problems(spec: JobSpec, settings: Settings, owner: str, *, admin: bool = False) -> list[AccessProblem]:
    """``priority`` over ``owner``'s ceiling; ``preemptible: false`` below ``NON_PREEMPTIBLE_MIN_PRIORITY``."""
    problems = []
    ceiling = priority_ceiling(settings, owner, admin=admin)
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


def spec_access_problems(spec: JobSpec, settings: Settings, owner: str | None = None, *, admin: bool = False) -> list[AccessProblem]:
    """Every field of ``spec`` that names a queue or a URI the settings do not allow ``owner``, and, with an
    ``owner`` (the API's check at submit), a priority or ``preemptible`` it may not ask for."""
    problems = [] if owner is None else priority_problems(spec, settings, owner, admin=admin)
    queue = spec.queue or settings.default_queue
    if queue not in settings.queues:
        problems.append(AccessProblem(("queue",), queue, f"queue {queue!r} is not one of the configured queues {settings.queues} (QUEUES)"))
    for loc, uri in spec.data_uris():
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
