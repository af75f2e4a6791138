"""Is this Celery worker alive? The image's HEALTHCHECK and the Kubernetes probes ask this.

``celery inspect ping`` alone is wrong for trainq's workers: the solo pool runs a job in the
worker's main thread, which also answers remote-control commands, so a worker busy training
does not answer a ping until the job ends. It is alive, though, while its heartbeat thread
keeps renewing the job's lease (:mod:`shared.lease`, owner token ``<node>:<random>``). So a
worker is healthy when it answers a ping, or when a running job's lease is held by it.

    python -m trainq.healthcheck [--node celery@host] [--timeout-s 10]

Exit status 0 when healthy, 1 otherwise; one line says why. Imports neither torch nor the
worker's tasks, so it is quick and cheap next to a training process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import redis

from shared.jobs import RUNNING_KEY
from shared.lease import LEASE_KEY
from shared.queue import make_celery
from shared.settings import Settings


def default_node() -> str:
    """The worker's Celery node name: ``WORKER_NAME`` if set, else ``celery@<hostname>`` (Celery's default)."""
    return os.environ.get("WORKER_NAME") or f"celery@{os.environ.get('HOSTNAME') or socket.gethostname()}"


def leased_job(client: redis.Redis, node: str) -> str | None:
    """Id of a running job whose live lease ``node`` holds, or None."""
    for raw_id in client.smembers(RUNNING_KEY):
        job_id = raw_id.decode()
        owner = client.get(LEASE_KEY.format(job_id))
        if owner is not None and owner.decode().startswith(f"{node}:"):
            return job_id
    return None


def check(settings: Settings, node: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """``(healthy, why)`` for worker ``node``.

    Args:
        settings: where Redis is (``REDIS_URL``).
        node: the worker's node name, e.g. ``celery@trainq-worker-a100-7d9f``.
        timeout_s: seconds to wait for the ping's reply.

    Raises:
        redis.RedisError: Redis is unreachable (the caller reports it as unhealthy).
    """
    replies = make_celery(settings).control.ping(destination=[node], timeout=timeout_s)
    if any(node in reply for reply in replies):
        return True, f"{node} answered a ping"
    job_id = leased_job(redis.Redis.from_url(settings.redis_url, socket_timeout=timeout_s), node)
    if job_id is not None:
        return True, f"{node} is training job {job_id} (its lease is live)"
    return False, f"{node} answered no ping within {timeout_s:g} s and holds no job lease"


def main(argv: list[str] | None = None) -> int:
    """``python -m trainq.healthcheck``: exit 0 if the worker is healthy, 1 if not."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default=default_node(), help="Celery node name (default: celery@$HOSTNAME or $WORKER_NAME)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="seconds to wait for the ping (default 10)")
    args = parser.parse_args(argv)
    try:
        healthy, why = check(Settings(), args.node, args.timeout_s)
    except redis.RedisError as exc:
        healthy, why = False, f"Redis unreachable: {exc}"
    print(why, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
