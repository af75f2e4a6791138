"""Scale-out on one host with real processes: several workers as several nodes would run them.

Each worker is its own ``celery -A worker worker`` process with its own name (``-n w1@host``) and
its own ``DATA_CACHE_DIR``, all on one Redis and one S3 server, consuming two queues. The fault
scenario (:func:`run_faults`, also run by ``tests/test_scale_out.py``): 3 workers, ~30 short CSV
jobs over two queues, then one worker is drained (SIGTERM) while it trains, one is killed
(kill -9) while it trains, and a new one joins mid-run. The throughput run (:func:`throughput`)
times the same batch of jobs on 1 worker and on 3.

    .venv/bin/python -m bench.scale_out                 # both; about 4 minutes on 2 cores
    .venv/bin/python -m bench.scale_out --jobs 30 --skip-throughput

On a 2-core machine three workers share two cores, so the 3-vs-1 ratio measures the overhead of
running more workers (and how much of a job is waiting on I/O), not the speed-up of three GPUs.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from trainq import healthcheck
from trainq.stack import LocalStack

QUEUES = ("gpu-a", "gpu-b")
#: Short leases and scans so a killed worker's job is requeued within seconds.
FAST_ENV = {
    "QUEUES": ",".join(["default", *QUEUES]),  # a spec may name only configured queues
    "LEASE_TTL_S": "2",
    "REAPER_INTERVAL_S": "0.5",
    "PROGRESS_INTERVAL_S": "0.2",
    "CANCEL_POLL_INTERVAL_S": "0.2",
    "TENSORBOARD_UPLOAD_INTERVAL_S": "5",
}
FINAL = {"succeeded", "failed", "cancelled"}


def job_spec(queue: str, epochs: int = 20) -> dict:
    """A short regression job on scikit-learn's diabetes table (``make up`` uploads it): an MLP,
    ``epochs`` epochs of 45 steps, a checkpoint every 5 epochs."""
    return {
        "name": f"scale-out-{queue}",
        "dataset": {"type": "csv", "uri": "s3://trainq/tables/diabetes.csv", "target": "target", "task": "regression"},
        "model": {"arch": "mlp", "hidden_sizes": [16]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "epochs": epochs,
        "batch_size": 8,
        "checkpoint": {"every_epochs": 5},
        "queue": queue,
    }


@dataclass
class Cluster:
    """A local stack with named workers (``w1``, ``w2``, ...) on :data:`QUEUES`, each with its own cache."""

    stack: LocalStack
    api: httpx.Client = field(init=False)
    workers: list[str] = field(default_factory=list)  # names ever started, in order
    _count: int = 0

    def __post_init__(self) -> None:
        self.api = httpx.Client(base_url=self.stack.api_url, timeout=30)

    def add_workers(self, count: int = 1) -> list[str]:
        """Start ``count`` workers on both queues, each with its own DATA_CACHE_DIR, side by side;
        return their names once all are ready."""
        names = []
        for _ in range(count):
            self._count += 1
            names.append(f"w{self._count}")
            self.stack.start_worker(names[-1], queues=list(QUEUES), own_cache=True, wait=False)
        for name in names:
            log = self.stack.logs / f"{name}.log"
            self.wait(lambda log=log: log.exists() and b" ready." in log.read_bytes(), 120, f"worker {name} ready", interval_s=0.2)
        self.workers += names
        return names

    def node(self, name: str) -> str:
        """The Celery node name of worker ``name`` (what job records name), e.g. ``w1@host``."""
        return f"{name}@{_hostname()}"

    def submit(self, spec: dict) -> str:
        response = self.api.post("/jobs", json=spec)
        response.raise_for_status()
        return response.json()["id"]

    def get(self, job_id: str) -> dict:
        return self.api.get(f"/jobs/{job_id}").raise_for_status().json()

    def wait(self, predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> object:
        """Call ``predicate`` every ``interval_s`` seconds until it returns something true; return that."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval_s)
        raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")

    def records(self) -> dict[str, dict]:
        """Every job's record (one ``GET /jobs`` page of up to 500), by id."""
        page = self.api.get("/jobs", params={"limit": 500}).raise_for_status().json()
        return {record["id"]: record for record in page["data"]}

    def running_on(self, name: str) -> str | None:
        """A job that worker ``name`` is training, past its first step and before half of its
        steps (so a signal sent now lands mid-job), or None."""
        for job_id, record in self.records().items():
            progress = record["progress"]
            if (record["state"] == "running" and record["worker"] == self.node(name)
                    and 1 <= progress["step"] <= progress["total_steps"] // 2):
                return job_id
        return None

    def wait_all(self, job_ids: list[str], timeout_s: float) -> list[dict]:
        """Wait until every job is final; return their records in ``job_ids`` order."""
        def final() -> dict[str, dict] | None:
            records = self.records()
            return records if all(records[j]["state"] in FINAL for j in job_ids) else None

        try:
            records = self.wait(final, timeout_s, "all jobs final", interval_s=0.5)
        except TimeoutError as exc:
            pending = {j: (r["state"], r["worker"], r["progress"]["step"]) for j, r in self.records().items()
                       if j in job_ids and r["state"] not in FINAL}
            raise TimeoutError(f"{exc}; not final (state, worker, step): {pending}") from None
        return [records[j] for j in job_ids]

    def close(self) -> None:
        self.api.close()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def start_cluster(workdir: Path, workers: int) -> Cluster:
    """Start Redis, S3, the API and ``workers`` workers; upload the diabetes table."""
    stack = LocalStack(workdir, workers=0, env=FAST_ENV, isolated=True).start()
    try:
        stack.seed_tables()
        cluster = Cluster(stack)
        cluster.add_workers(workers)
        return cluster
    except BaseException:
        stack.stop()
        raise


@dataclass
class FaultRun:
    """What :func:`run_faults` did and saw."""

    jobs: dict[str, list[str]]  # queue -> job ids, in submit order
    records: dict[str, dict]  # job id -> final record
    drained: str  # worker name
    drained_job: str
    drained_exit: int | None
    killed: str
    killed_job: str
    added: str
    health_busy: tuple[bool, str]  # the healthcheck on the worker about to be killed, while it trained
    health_killed: tuple[bool, str]  # the same after the kill -9
    caches: dict[str, list[str]]  # worker name -> files in its own DATA_CACHE_DIR
    seconds: float


def run_faults(cluster: Cluster, jobs_per_queue: tuple[int, int] = (20, 10), epochs: int = 20, timeout_s: float = 480) -> FaultRun:
    """Submit jobs to both queues (all of the first queue's before the second's), drain one worker
    while it trains (SIGTERM), kill -9 another while it trains, add a new one; wait for all jobs.

    Requires at least 3 running workers in ``cluster``.
    """
    started = time.monotonic()
    first, second, third = cluster.workers[:3]
    jobs = {queue: [] for queue in QUEUES}
    for queue, count in zip(QUEUES, jobs_per_queue):
        for _ in range(count):
            jobs[queue].append(cluster.submit(job_spec(queue, epochs)))
    every = [job_id for ids in jobs.values() for job_id in ids]

    # Drain: SIGTERM while it trains; the job checkpoints and goes back to the queue.
    drained_job = cluster.wait(lambda: cluster.running_on(first), 120, f"{first} training")
    drained_exit = cluster.stack.stop_process(first, signal.SIGTERM, timeout_s=60)

    # Kill -9 while it trains; its lease expires and a reaper requeues the job.
    killed_job = cluster.wait(lambda: cluster.running_on(second), 120, f"{second} training")
    health_busy = healthcheck.check(cluster.stack.settings, cluster.node(second), timeout_s=1)
    cluster.stack.stop_process(second, signal.SIGKILL)

    # A new node joins while jobs are still queued.
    (added,) = cluster.add_workers(1)
    cluster.wait(lambda: cluster.get(killed_job)["state"] != "running", 60, "the killed worker's job requeued")
    health_killed = healthcheck.check(cluster.stack.settings, cluster.node(second), timeout_s=1)
    records = cluster.wait_all(every, timeout_s)
    caches = {
        name: sorted(str(p.relative_to(cluster.stack.workdir)) for p in (cluster.stack.workdir / f"cache-{name}").rglob("*") if p.is_file())
        for name in cluster.workers
    }
    return FaultRun(
        jobs=jobs,
        # The list view is a summary: the whole records (transitions, deliveries) for the checks.
        records={r["id"]: cluster.api.get(f"/jobs/{r['id']}").raise_for_status().json() for r in records},
        drained=first,
        drained_job=drained_job,
        drained_exit=drained_exit,
        killed=second,
        killed_job=killed_job,
        added=added,
        health_busy=health_busy,
        health_killed=health_killed,
        caches=caches,
        seconds=time.monotonic() - started,
    )


def throughput(workdir: Path, workers: int, jobs: int, epochs: int) -> float:
    """Jobs per minute for ``jobs`` jobs (alternating queues) on ``workers`` workers, from the first
    submit to the last job's end (worker start-up not counted)."""
    cluster = start_cluster(workdir, workers)
    try:
        started = time.monotonic()
        ids = [cluster.submit(job_spec(QUEUES[i % 2], epochs)) for i in range(jobs)]
        records = cluster.wait_all(ids, 600)
        seconds = time.monotonic() - started
        assert all(r["state"] == "succeeded" for r in records), [r["error"] for r in records if r["state"] != "succeeded"]
        return jobs / seconds * 60
    finally:
        cluster.close()
        cluster.stack.stop()


def summarize(run: FaultRun, node: Callable[[str], str]) -> str:
    """A few lines on a fault run: outcomes, attempts, who finished what."""
    records = list(run.records.values())
    by_worker: dict[str, int] = {}
    for record in records:
        by_worker[record["worker"]] = by_worker.get(record["worker"], 0) + 1
    states = {s: sum(r["state"] == s for r in records) for s in {r["state"] for r in records}}
    return "\n".join(
        [
            f"{len(records)} jobs in {run.seconds:.1f} s: {states}; attempts>1: "
            f"{sum(r['attempts'] > 1 for r in records)}; duplicate deliveries: {sum(r['duplicate_deliveries'] for r in records)}",
            f"drained {run.drained} (exit {run.drained_exit}) during job {run.drained_job[:8]}: "
            f"attempts {run.records[run.drained_job]['attempts']}, finished by {run.records[run.drained_job]['worker']}",
            f"killed {run.killed} during job {run.killed_job[:8]}: attempts {run.records[run.killed_job]['attempts']}, "
            f"finished by {run.records[run.killed_job]['worker']}",
            f"healthcheck of {node(run.killed)}: busy {run.health_busy}, after kill -9 {run.health_killed}",
            f"jobs finished per worker: {dict(sorted(by_worker.items()))} (added mid-run: {node(run.added)})",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs in each run (default 30)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per job (default 20)")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trainq-scale-out-"))
    cluster = start_cluster(tmp / "faults", 3)
    try:
        run = run_faults(cluster, (args.jobs * 2 // 3, args.jobs - args.jobs * 2 // 3), args.epochs)
        print(summarize(run, cluster.node), flush=True)
        ok = all(r["state"] == "succeeded" for r in run.records.values())
    finally:
        cluster.close()
        cluster.stack.stop()
    if not args.skip_throughput:
        rates = {n: throughput(tmp / f"throughput-{n}", n, args.jobs, args.epochs) for n in (1, 3)}
        print(f"throughput, {args.jobs} jobs of {args.epochs} epochs: 1 worker {rates[1]:.1f} jobs/min, "
              f"3 workers {rates[3]:.1f} jobs/min (x{rates[3] / rates[1]:.2f})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
