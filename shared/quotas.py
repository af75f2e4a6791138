"""Per-owner submission rate limit, a sliding window in Redis.

Each accepted submission adds a timestamp to the sorted set ``trainq:rate:<owner>``; a Lua
script drops those older than the window, counts the rest and refuses once ``limit`` is reached,
all atomically, so concurrent API processes share one count. The other per-owner quota, jobs
queued or running at once (``MAX_ACTIVE_JOBS_PER_OWNER``), is checked by
:meth:`shared.jobs.JobStore.create` in the transaction that records the job.
"""

from __future__ import annotations

import time
import uuid

import redis

from shared.exceptions import QuotaExceededError

RATE_KEY = "trainq:rate:{}"

# Returns nil when the call is counted, else the seconds until the oldest call leaves the window.
_SLIDING_WINDOW = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return false
"""


def count_submission(client: redis.Redis, owner: str, per_minute: int, *, window_s: float = 60.0) -> None:
    """Count one submission by ``owner``; refuse it if ``per_minute`` were exceeded.

    Raises:
        QuotaExceededError: ``owner`` already submitted ``per_minute`` times in the last
            ``window_s`` seconds; ``retry_after_s`` says when the next one is accepted.
    """
    script = client.register_script(_SLIDING_WINDOW)
    wait = script(keys=[RATE_KEY.format(owner)], args=[time.time(), window_s, per_minute, uuid.uuid4().hex])
    if wait is not None:
        raise QuotaExceededError(
            f"owner {owner!r} submitted {per_minute} jobs in the last {window_s:g} s (SUBMISSIONS_PER_MINUTE); "
            "try again later",
            retry_after_s=max(1.0, float(wait)),
        )
