"""Scale-out on one host, real processes: three workers as three nodes (own names, own caches)
on one Redis and one S3 server, ~30 jobs over two queues; one worker drained (SIGTERM) and one
killed (kill -9) while they train, a new one added mid-run. Every job must succeed exactly once,
neither queue may wait for the other, and each record names the worker that finished it.
The scenario lives in bench/scale_out.py (which also measures throughput)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.scale_out import QUEUES, Cluster, FaultRun, run_faults, start_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("scale-out"), workers=3)
    try:
        yield running
    finally:
        running.close()
        running.stack.stop()


@pytest.fixture(scope="module")
def run(cluster: Cluster) -> FaultRun:
    return run_faults(cluster, jobs_per_queue=(20, 10))


def test_every_job_succeeds_exactly_once(run: FaultRun):
    assert len(run.records) == 30
    for job_id, record in run.records.items():
        states = [t["state"] for t in record["transitions"]]
        assert record["state"] == "succeeded", (job_id, record["error"])
        assert states.count("succeeded") == 1 and states.count("running") == record["attempts"], states
        assert record["duplicate_deliveries"] == 0
        # Only the two interrupted jobs needed a second attempt.
        assert record["attempts"] == (2 if job_id in (run.drained_job, run.killed_job) else 1), (job_id, states)


def test_drained_worker_requeues_its_job_and_exits_cleanly(run: FaultRun, cluster: Cluster):
    assert run.drained_exit == 0
    record = run.records[run.drained_job]
    retry = next(t for t in record["transitions"] if t["state"] == "retrying")
    assert "shut down" in retry["reason"] and cluster.node(run.drained) in retry["reason"]
    assert record["resumed_from"] is not None  # the SIGTERM saved a checkpoint; the next attempt used it
    assert record["worker"] != cluster.node(run.drained)


def test_killed_worker_job_is_resumed_by_another_worker(run: FaultRun, cluster: Cluster):
    record = run.records[run.killed_job]
    retry = next(t for t in record["transitions"] if t["state"] == "retrying")
    assert "lost" in retry["reason"] and cluster.node(run.killed) in retry["reason"]
    assert record["worker"] not in (cluster.node(run.killed), cluster.node(run.drained))


def test_healthcheck_follows_the_worker(run: FaultRun):
    # Training in the solo pool, the worker answers no ping; its live lease counts as alive.
    assert run.health_busy[0], run.health_busy
    # After kill -9 and the lease's expiry, it is reported dead.
    assert not run.health_killed[0], run.health_killed


def test_healthcheck_command_exit_status(run: FaultRun, cluster: Cluster):
    """What the image's HEALTHCHECK and the Kubernetes probes run, against live and gone workers."""
    def probe(name: str) -> int:
        argv = [sys.executable, "-m", "trainq.healthcheck", "--node", cluster.node(name), "--timeout-s", "2"]
        return subprocess.run(argv, env=cluster.stack.env, capture_output=True, timeout=60).returncode

    assert probe(run.added) == 0
    assert probe(run.drained) == 1


def test_records_name_the_finishing_worker_and_the_new_worker_takes_jobs(run: FaultRun, cluster: Cluster):
    nodes = {cluster.node(name) for name in cluster.workers}
    finishers = [record["worker"] for record in run.records.values()]
    assert set(finishers) <= nodes
    assert cluster.node(run.added) in finishers  # the worker added mid-run got work


def test_no_queue_starves(run: FaultRun):
    # All of the first queue's jobs were submitted before the second queue's. A worker on both
    # queues alternates between them, so the second queue's jobs all start before the first
    # queue's last one; FIFO over both queues would start them after it.
    started = {job_id: record["started_at"] for job_id, record in run.records.items()}
    first, second = (run.jobs[queue] for queue in QUEUES)
    assert max(started[j] for j in second) < max(started[j] for j in first)


def test_each_worker_has_its_own_cache(run: FaultRun, cluster: Cluster):
    # Every worker trained at least once (the drained and killed ones too), each downloading the
    # table into its own DATA_CACHE_DIR; none used the stack's shared one.
    for name in cluster.workers:
        assert any(path.startswith(f"cache-{name}/datasets/") and path.endswith("/diabetes.csv") for path in run.caches[name]), (
            name, run.caches[name])
    assert not (Path(cluster.stack.workdir) / "cache").exists()
