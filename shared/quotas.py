"""Per-owner submission rate limit, a sliding window in Redis.

Each accepted submission adds a timestamp to the sorted set ``trainq:rate:<owner>``; a Lua
script drops those older than the window, counts the rest and refuses once ``limit`` is reached,
all atomically, so concurrent API processes share one count. The other per-owner quotas, jobs
queued or running at once (``MAX_ACTIVE_JOBS_PER_OWNER``) and jobs waiting to start
(``MAX_PENDING_JOBS_PER_OWNER``), are checked by :meth:`shared.jobs.JobStore.create` in the
script that records the job.
"""

from __future__ import annotations

import time
import uuid

import redis.asyncio

from shared.exceptions import QuotaExceededError

RATE_KEY = "trainq:rate:{}"

#: Lua: ``count_call(key, now, window, limit, member)`` counts one call in the sliding window of
#: ``key``; it returns false when the call is counted, else the seconds (a string) until the oldest
#: call leaves the window. Shared by :func:`count_submission` and the submission script of
#: :meth:`shared.jobs.JobStore.create`, so the two count alike.
COUNT_CALL_LUA = """
local function count_call(key, now, window, limit, member)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return tostring(tonumber(oldest[2]) + window - now)
  end
  redis.call('ZADD', key, now, member)
  redis.call('EXPIRE', key, math.ceil(window) + 1)
  return false
end
"""

_SLIDING_WINDOW = COUNT_CALL_LUA + """
return count_call(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])
"""


def rate_exceeded(owner: str, per_minute: int, window_s: float, wait_s: str | bytes | float) -> QuotaExceededError:
    """The error for ``owner`` over ``per_minute`` submissions; ``wait_s``: what ``count_call`` returned."""
    return QuotaExceededError(
        f"owner {owner!r} submitted {per_minute} jobs in the last {window_s:g} s (SUBMISSIONS_PER_MINUTE); "
        "try again later",
        retry_after_s=max(1.0, float(wait_s)),
    )


async def count_submission(client: redis.asyncio.Redis, owner: str, per_minute: int, *, window_s: float = 60.0) -> None:
    """Count one submission by ``owner`` (on the API's asyncio client); refuse it if ``per_minute`` were exceeded.

    Raises:
        QuotaExceededError: ``owner`` already submitted ``per_minute`` times in the last
            ``window_s`` seconds; ``retry_after_s`` says when the next one is accepted.
    """
    script = client.register_script(_SLIDING_WINDOW)
    wait = await script(keys=[RATE_KEY.format(owner)], args=[time.time(), window_s, per_minute, uuid.uuid4().hex])
    if wait is not None:
        raise rate_exceeded(owner, per_minute, window_s, wait)
