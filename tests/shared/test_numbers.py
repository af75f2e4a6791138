"""Property tests of the parsers of outside input (issue 17): whatever a client sends, each parser
returns a well-formed value or raises ValueError; nothing else escapes (which was a 500)."""

from __future__ import annotations

import base64
import json
import math

from hypothesis import example, given, strategies as st

from api.main import MAX_ECHO_DEPTH, _echoable
from shared.jobs import decode_cursor, encode_cursor
from shared.numbers import parse_float, parse_int

ANY_TEXT = st.text() | st.from_regex(r"-?[0-9._eE+\-²٣ ]{0,30}", fullmatch=True)


@given(ANY_TEXT)
@example("²")
@example("١٢")
@example(" 1")
@example("1_000")
@example("-0")
@example("01")
@example(str(2**64))
def test_parse_int_returns_a_bounded_int_or_raises_value_error(text: str):
    try:
        value = parse_int(text, low=1, high=10**9)
    except ValueError:
        return
    assert 1 <= value <= 10**9 and str(value) == text


@given(ANY_TEXT | st.floats().map(repr))
@example("nan")
@example("inf")
@example("-Infinity")
@example("1e999")
@example("1_0.5")
@example(" 2.5")
@example("٣.5")
def test_parse_float_returns_a_finite_float_or_raises_value_error(text: str):
    try:
        value = parse_float(text)
    except ValueError:
        return
    assert math.isfinite(value) and text.isascii() and text.strip() == text


@given(st.floats(allow_nan=False, allow_infinity=False), st.text(min_size=1))
def test_a_cursor_round_trips(score: float, job_id: str):
    try:
        cursor = encode_cursor(score, job_id)
    except UnicodeEncodeError:
        return  # a lone surrogate is never a job id
    assert decode_cursor(cursor) == (score, job_id)


@given(st.text(max_size=80) | st.binary(max_size=60).map(lambda raw: base64.urlsafe_b64encode(raw).decode()))
@example(base64.urlsafe_b64encode(b"nan x").decode())
@example(base64.urlsafe_b64encode(b"inf x").decode())
def test_any_cursor_decodes_to_a_finite_score_or_raises_value_error(cursor: str):
    try:
        score, job_id = decode_cursor(cursor)
    except ValueError:
        return
    assert math.isfinite(score) and isinstance(job_id, str)


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=30,
)


def _nest(value: object, depth: int, as_dict: bool) -> object:
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


@given(JSON, st.integers(0, 5000), st.booleans())
@example("\ud800", 950, True)
@example(float("nan"), 600, False)
def test_any_json_value_is_echoed_as_valid_bounded_json(value: object, depth: int, as_dict: bool):
    echoed = _echoable(_nest(value, depth, as_dict))
    text = json.dumps(echoed, allow_nan=False)  # finite numbers only, and no recursion past the bound
    text.encode("utf-8")  # no lone surrogates
    levels = 0
    while isinstance(echoed, dict | list) and echoed:
        echoed, levels = (next(iter(echoed.values())) if isinstance(echoed, dict) else echoed[0]), levels + 1
    assert levels <= MAX_ECHO_DEPTH
