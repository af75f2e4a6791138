"""Token look-ups per client address: what an unauthenticated flood may cost before any Redis call.

A bearer token costs one Redis ``HGETALL`` to check, so a client sending random tokens spent the
API's Redis connections (issue 17). :class:`LookupLimiter` counts, per client address and in this
process, the tokens that failed to authenticate in the last window and those being looked up now
(malformed ones included: they are refused without a look-up, but counted); past
``AUTH_LOOKUPS_PER_MINUTE`` such a client gets a 429 before any Redis call. A look-up that succeeds
is not counted, and a token that authenticated in the window is never refused, so its owner keeps
working from behind the same address (a NAT, a proxy) while another client there floods. It is
still looked up: a revoked token fails at once.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque

#: Addresses and known tokens tracked at most (the oldest are forgotten first): bounded memory.
_MAX_TRACKED = 10_000


class LookupLimiter:
    """Sliding-window count of failed (and pending) token look-ups per client address.

    Args:
        per_window: failed or pending look-ups one address may have in a window.
        window_s: the window in seconds.
    """

    def __init__(self, per_window: int, window_s: float = 60.0) -> None:
        self.per_window, self.window_s = per_window, window_s
        self._calls: OrderedDict[str, deque[float]] = OrderedDict()
        self._known: OrderedDict[str, float] = OrderedDict()  # token digest → when it last authenticated

    def admit(self, address: str, token: str) -> float | None:
        """Count ``token`` presented from ``address`` unless it authenticated in the window; call
        :meth:`authenticated` when it does (that takes the count back).

        Returns:
            None when it may be looked up; else the seconds until ``address`` may try again.
        """
        now = time.monotonic()
        if self._is_known(token, now):
            return None
        calls = self._calls.setdefault(address, deque())
        self._calls.move_to_end(address)
        while calls and now - calls[0] >= self.window_s:
            calls.popleft()
        if len(calls) >= self.per_window:
            return max(1.0, math.ceil(calls[0] + self.window_s - now))
        calls.append(now)
        _trim(self._calls)
        return None

    def authenticated(self, address: str, token: str) -> None:
        """``token`` from ``address`` authenticated: take back its count and never refuse it for a window."""
        now = time.monotonic()
        calls = self._calls.get(address)
        if calls and not self._is_known(token, now):  # admit counted it
            calls.pop()  # counts only: which of the address's entries goes does not matter
        key = _digest(token)
        self._known[key] = now
        self._known.move_to_end(key)
        _trim(self._known)


    def _is_known(self, token: str, now: float) -> bool:
        seen = self._known.get(_digest(token))
        return seen is not None and now - seen < self.window_s


def _digest(token: str) -> str:
    # Not the stored form's key (that is a SHA-256 too, but this one never leaves the process).
    return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _trim(table: OrderedDict) -> None:
    while len(table) > _MAX_TRACKED:
        table.popitem(last=False)
