"""Infrastructure settings shared by the API and the worker, read from environment variables.

Job specs (what to train) live in :mod:`shared.spec`; this module only says where things are
(Redis, the S3 endpoint and bucket) and the service-wide limits.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.names import check_queue_name, check_s3_prefix


class Settings(BaseSettings):
    """Where trainq's parts live. Every field is an environment variable of the same name, upper-cased.

    AWS credentials use boto3's own variable names (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so the same variables serve trainq, the AWS
    CLI and TensorBoard. Left unset, boto3's default chain applies (config files, instance roles).
    """

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the job queue and job records.")
    s3_endpoint_url: str | None = Field(
        None, description="S3 API endpoint (MinIO, moto). Unset means AWS S3 itself."
    )
    aws_access_key_id: str | None = Field(None, description="S3 access key (boto3's default chain if unset).")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 secret key.")
    aws_default_region: str | None = Field(None, description="S3 region, e.g. `us-east-1`.")
    s3_public_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint as clients outside the cluster reach it, for presigned artifact URLs and "
        "`trainq tensorboard` (e.g. `https://minio.example.com`); default `S3_ENDPOINT_URL`.",
    )
    s3_bucket: str = Field("trainq", description="Bucket that holds datasets and job artifacts.")
    s3_prefix: str = Field(
        "jobs", description="Key prefix under which each job writes `<prefix>/<job_id>/...`."
    )
    default_queue: str = Field("default", description="Celery queue a job goes to when its spec names none.")
    # -- who may submit, and how much ----------------------------------------------------------
    auth_required: bool = Field(
        False,
        description="Require a bearer token on every route but `/healthz` and `/readyz` (401 without one). Off: requests "
        "without a token act as owner `local`, and only loopback clients are served.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="A bearer token that acts as the admin owner `admin`, for bootstrapping; at least 32 characters "
        "(e.g. `openssl rand -hex 32`), a shorter one is ignored with a warning. Per-user tokens: "
        "`python -m trainq.admin token create`.",
    )
    auth_lookups_per_minute: int = Field(
        120,
        ge=1,
        description="Failed (or pending) bearer-token look-ups one client address may cause in one API process in any "
        "60 s (malformed tokens included); more is a 429 before any Redis call. A look-up that succeeds is not counted, "
        "and a token that authenticated in the last minute is never refused. Behind a proxy every client has the "
        "proxy's address.",
    )
    api_redis_connections: int = Field(
        100, ge=1, description="Redis connections one API process keeps for its routes; a request waits for a free one."
    )
    api_redis_wait_s: float = Field(
        10.0, gt=0, description="Seconds a request waits for a free Redis connection (`API_REDIS_CONNECTIONS`) before a 503."
    )
    max_active_jobs_per_owner: int = Field(
        100, ge=1, description="Jobs an owner may have queued, running or retrying at once; more is a 429."
    )
    submissions_per_minute: int = Field(
        60, ge=1, description="`POST /jobs` calls (dry runs included) an owner may make in any 60 s; more is a 429."
    )
    # -- sharing the workers: priority, fair share, preemption (shared.scheduler) ------------------
    priority_ceiling: int = Field(
        70, ge=0, le=100,
        description="Highest spec `priority` an owner may give (a higher one is a 422); the range above is for the "
        "owners of `PRIORITY_CEILING_BY_OWNER`.",
    )
    priority_ceiling_by_owner: dict[str, int] = Field(
        {}, description="Per-owner ceilings as JSON, e.g. `{\"oncall\": 100, \"interns\": 30}`; others get `PRIORITY_CEILING`."
    )
    non_preemptible_min_priority: int = Field(
        80, ge=0, le=100, description="Lowest `priority` at which a spec may say `preemptible: false`."
    )
    fair_share_weights: dict[str, float] = Field(
        {},
        description="Owners' shares as JSON, e.g. `{\"vision\": 2, \"nlp\": 1}`; an owner not named has 1. Among jobs "
        "of equal priority, the owner furthest below its share of the GPUs goes first.",
    )
    fair_share_half_life_s: float = Field(
        24 * 3600.0, gt=0,
        description="Half-life of the usage that fair share counts (GPU-seconds, decayed as Slurm's "
        "PriorityDecayHalfLife): an hour used a half-life ago weighs half an hour now.",
    )
    dispatch_interval_s: float = Field(
        1.0, gt=0,
        description="Seconds between the dispatcher's passes when nothing wakes it (a submit or a worker falling "
        "idle wakes it at once); also the longest a preemption waits to be asked.",
    )
    max_running_jobs_per_owner: int | None = Field(
        None, ge=1, description="Jobs (of any queue) an owner may have running at once; the others wait, pending, and "
        "other owners' jobs go first. Unset: no limit (`MAX_ACTIVE_JOBS_PER_OWNER` still caps jobs queued and running)."
    )
    max_pending_jobs_per_owner: int | None = Field(
        None, ge=1, description="Jobs an owner may have waiting to start (queued, retrying or preempted, on any queue) "
        "at once; a submit past it is a 429. Unset: no limit (`MAX_ACTIVE_JOBS_PER_OWNER` still caps jobs queued and "
        "running)."
    )
    visibility_timeout_s: int = Field(
        7 * 24 * 3600,
        gt=0,
        description=(
            "Redis broker visibility timeout in seconds. A message not acknowledged within it is "
            "delivered again, so it must exceed the longest job (tasks are acknowledged late)."
        ),
    )
    data_cache_dir: Path = Field(
        Path.home() / ".cache" / "trainq",
        description="Worker-local directory where datasets are downloaded and jobs keep scratch files.",
    )
    data_root: Path | None = Field(
        None,
        description="Worker-local folder that `local://<path>` dataset URIs are read from; unset refuses them.",
    )
    progress_interval_s: float = Field(
        2.0, gt=0, description="Seconds between progress writes to the job record while training."
    )
    tensorboard_upload_interval_s: float = Field(
        30.0, gt=0, description="Seconds between TensorBoard event uploads within an epoch (also at every epoch end)."
    )
    max_runtime_s: float = Field(
        3 * 24 * 3600,
        gt=0,
        description="Ceiling on any job's run time in seconds (all attempts, download included); a spec's "
        "`max_runtime_s` may only lower it.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts per job before infrastructure failures (worker lost, S3 down) fail it."
    )
    lease_ttl_s: float = Field(
        30.0, gt=0, description="Seconds a running job's heartbeat lives; a job whose worker died is requeued after it."
    )
    reaper_interval_s: float = Field(10.0, gt=0, description="Seconds between a worker's scans for jobs whose worker died.")
    cancel_poll_interval_s: float = Field(1.0, gt=0, description="Seconds between a worker's checks for a cancel request.")
    stop_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Seconds a running job may take to notice a cancel, time limit or shutdown (plus, once noticed, the "
        "minute its last checkpoint upload may take); past that the worker's watchdog kills the job's processes and "
        "ends it as hung (`worker/watchdog.py`).",
    )
    stall_timeout_s: float = Field(
        900.0,
        ge=0,
        description="Seconds a running job may go without progress (a step, a validation batch, a file or bytes "
        "downloaded) before the watchdog stops it as hung and requeues it (up to `max_attempts`); 0 never does.",
    )
    log_upload_interval_s: float = Field(
        5.0, gt=0, description="Seconds between uploads of a running job's log (`<prefix>/<job_id>/logs/attempt-N.log`)."
    )
    log_max_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Bytes of log kept per attempt; later lines are dropped (the log says so)."
    )
    worker_heartbeat_interval_s: float = Field(
        10.0, gt=0, description="Seconds between a worker's status reports in Redis (`GET /workers`); gone after 3 missed."
    )
    artifact_url_expiry_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Seconds the presigned URLs of `GET /jobs/{id}/artifacts` stay valid."
    )
    upload_deadline_s: float = Field(
        900.0,
        gt=0,
        description="Seconds an artifact upload keeps retrying through an S3 outage before the attempt fails.",
    )
    dry_run_queue: str = Field(
        "dry-run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
        description="Celery queue of dry runs (`POST /jobs?dry_run=true`). A worker started without `-Q` consumes it "
        "and `DEFAULT_QUEUE`; with `-Q`, name it too (`-Q default,dry-run`).",
    )
    dry_run_timeout_s: float = Field(
        120.0, gt=0, description="Seconds the API waits for a worker's dry-run result before answering `504`."
    )
    dry_runs_per_owner: int = Field(
        4, ge=1, description="Dry runs one owner may have waiting or running at once; more is a 429 with `Retry-After`."
    )
    dry_runs_max: int = Field(
        64, ge=1, description="Dry runs all owners together may have waiting or running at once; more is a 429. Owners "
        "are served in turn, one dry run each, so one owner's backlog does not delay another's."
    )
    max_job_memory_bytes: int | None = Field(
        None,
        gt=0,
        description=(
            "Memory a job may need by the estimate made before training (parameters, gradients, optimizer state, "
            "activations), in bytes. Unset: 90% of the GPU's memory, or 75% of the worker's RAM (its cgroup limit "
            "if lower) on a CPU. Set it on CPU workers that serve dry runs for GPU workers."
        ),
    )
    max_image_pixels: int = Field(
        40_000_000,
        gt=0,
        description=(
            "Largest image a job may decode, in pixels (width × height); larger ones fail the job naming the file. "
            "Below Pillow's own decompression-bomb limit (89,478,485)."
        ),
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="Intra-op CPU threads of a training job (every attempt). 0 chooses: a resumed job keeps "
        "the count its checkpoint was trained with (results differ in the last bits between counts); a new "
        "job reserves a core per DataLoader worker (the CPUs the worker may use by affinity and cgroup quota, "
        "minus the spec's `num_workers`, at least 1; with `num_workers: 0`, every CPU, without a probe), except "
        "that a CPU job with DataLoader workers in one process (not `resources.gpus` > 1) first times loading "
        "a batch and a training step at both counts and takes every CPU when its workers would idle "
        "(loading costs at most a quarter of a step) and that is at least 10% faster by a pessimistic estimate "
        "(a small CNN on 64 px photos, 2 cores: 94 samples/s at 1 thread, 189 at 2; on a busy machine 2 threads "
        "can be slower and the probe keeps 1). The job log shows the measurement. Set it to pin the count: two "
        "jobs of one spec then train bit-identically.",
    )
    allow_cpu_ddp: bool = Field(
        False,
        description="Run a spec's `resources.gpus: N` (N > 1) on a worker without CUDA as N CPU processes "
        "(the gloo backend): for tests and development. Off, such a job fails at start.",
    )
    queues: Annotated[list[str], NoDecode] = Field(
        ["default"],
        description=(
            "Queues a spec's `queue` may name (comma-separated, or a JSON list); `DEFAULT_QUEUE` must be "
            "one of them. Set the same list on the API and the workers."
        ),
    )
    data_uris_allowed: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description=(
            "S3 prefixes a spec may read data and weights from (comma-separated, or a JSON list), e.g. "
            "`s3://trainq/datasets/,s3://team-data/`. Unset: `datasets/`, `tables/` and `weights/` of `S3_BUCKET`."
        ),
    )
    data_uris_allowed_by_owner: dict[str, list[str]] = Field(
        {},
        description=(
            "More S3 prefixes (and `local://` folders) per owner, as JSON: `{\"alice\": [\"s3://team-a/\", "
            "\"local://alice/\"]}`. An owner's specs may read `DATA_URIS_ALLOWED`, `LOCAL_PATHS_ALLOWED` and its "
            "own entries here; other owners' entries stay closed to it."
        ),
    )
    local_paths_allowed: Annotated[list[str], NoDecode] = Field(
        ["local://"],
        description=(
            "`local://` folders under `DATA_ROOT` every owner's specs may read (comma-separated, or a JSON list), "
            "e.g. `local://shared/`; the default `local://` is all of `DATA_ROOT`; empty: none (then only an "
            "owner's own `local://` entries of `DATA_URIS_ALLOWED_BY_OWNER`)."
        ),
    )

    @field_validator("queues", "data_uris_allowed", "local_paths_allowed", mode="before")
    @classmethod
    def _split_list(cls, value: object, info: ValidationInfo) -> object:
        # Environment variables hold `a,b` or `["a", "b"]`. An empty DATA_URIS_ALLOWED means its default.
        if isinstance(value, str):
            text = value.strip()
            items = json.loads(text) if text.startswith("[") else [item.strip() for item in text.split(",") if item.strip()]
            return None if not items and info.field_name == "data_uris_allowed" else items
        return value

    @field_validator("data_uris_allowed_by_owner", "priority_ceiling_by_owner", "fair_share_weights", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        # From the environment (or a dict of environment strings, as LocalStack.settings builds).
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _queues_and_prefixes_are_safe(self) -> Settings:
        for queue in [*self.queues, self.dry_run_queue]:
            check_queue_name(queue)
        if self.default_queue not in self.queues:
            raise ValueError(f"DEFAULT_QUEUE {self.default_queue!r} must be one of QUEUES {self.queues}")
        for prefix in [*(self.data_uris_allowed or []), *(p for ps in self.data_uris_allowed_by_owner.values() for p in ps),
                       *self.local_paths_allowed]:
            check_s3_prefix(prefix)
        self._check_data_root_apart()
        return self

    def _check_data_root_apart(self) -> None:
        # A cache inside DATA_ROOT made every owner's cached S3 data, other jobs' work folders and
        # live logs readable as `local://cache/...` (issue 17); DATA_ROOT inside the cache would
        # let a job's downloads appear as local data.
        if self.data_root is None:
            return
        root, cache = self.data_root.expanduser().resolve(), self.data_cache_dir.expanduser().resolve()
        if cache.is_relative_to(root) or root.is_relative_to(cache):
            raise ValueError(
                f"DATA_ROOT ({root}) and DATA_CACHE_DIR ({cache}) must not contain one another: `local://` URIs would "
                "read other owners' cached data and jobs' work folders. Put them side by side (e.g. /data and /cache)."
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide :class:`Settings`, read from the environment on first call."""
    return Settings()
