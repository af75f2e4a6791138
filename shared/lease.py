"""Per-job leases in Redis: the heartbeat that says a worker is alive and owns a running job.

A lease is the key ``trainq:lease:<job_id>`` holding its owner's token, with a TTL. The worker
renews it every ``lease_ttl_s / 3`` seconds; if the worker dies, the key expires and the reaper
sends the job back to the queue. Renewal checks the token, so a worker whose job was taken
over learns it has lost the lease and stops writing.
"""

from __future__ import annotations

import uuid

import redis

LEASE_KEY = "trainq:lease:{}"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class JobLease:
    """The lease on one job, held by one owner.

    Args:
        client: Redis holding the job records.
        job_id: the job leased.
        ttl_s: seconds the lease lives without renewal.
        owner: a label for logs (the worker's name); a random token is appended.
    """

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: float, owner: str = "worker") -> None:
        self.redis = client
        self.key = LEASE_KEY.format(job_id)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = f"{owner}:{uuid.uuid4().hex}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; True on success."""
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lease by its TTL; False if it expired or another owner holds it."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        """Give the lease up (only if still ours)."""
        self._release(keys=[self.key], args=[self.token])

    @staticmethod
    def is_held(client: redis.Redis, job_id: str) -> bool:
        """True while some worker holds a live lease on ``job_id``."""
        return bool(client.exists(LEASE_KEY.format(job_id)))
