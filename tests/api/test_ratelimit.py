"""The per-address limit on failed token look-ups (:mod:`api.ratelimit`)."""

from __future__ import annotations

from api.ratelimit import LookupLimiter


def test_failed_look_ups_are_limited_per_address_and_known_tokens_pass():
    limiter = LookupLimiter(3, window_s=60)
    assert limiter.admit("10.0.0.1", "good") is None
    limiter.authenticated("10.0.0.1", "good")  # a new, valid token costs nothing
    for n in range(3):
        assert limiter.admit("10.0.0.1", f"random-{n}") is None  # each fails its look-up
    assert 1 <= limiter.admit("10.0.0.1", "random-3") <= 60  # over: refused before any look-up
    assert limiter.admit("10.0.0.2", "random-3") is None  # another address has its own count
    assert limiter.admit("10.0.0.1", "good") is None  # the owner behind the same address goes on
    limiter.authenticated("10.0.0.1", "good")
    assert limiter.admit("10.0.0.1", "random-4") is not None  # and the flood stays refused
