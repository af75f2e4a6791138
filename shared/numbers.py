"""The one strict parser of numbers that come from outside (cursors, headers, anything a client sent).

Python's ``int`` and ``float`` accept far more than a client should send: ``float("nan")``,
``"inf"``, ``"1_000"``, surrounding whitespace, and ``int("²")`` raises although ``"²".isdigit()``
is True. A cursor decoding to ``"nan x"`` reached Redis as a score and was a 500 (issue 17).
Here only plain ASCII decimal notation is a number, finite and within bounds; everything else is
a :class:`ValueError` the API turns into a 4xx.
"""

from __future__ import annotations

import math
import re

_INT = re.compile(r"0|[1-9][0-9]{0,18}")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,18})(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")


def parse_int(text: str, *, low: int = 0, high: int = 2**63 - 1) -> int:
    """``text`` as an int: ASCII digits only, no sign, no leading zero, within ``[low, high]``.

    Raises:
        ValueError: anything else (naming the text, cut to 40 characters).
    """
    if not isinstance(text, str) or not _INT.fullmatch(text) or not low <= (value := int(text)) <= high:
        raise ValueError(f"not a whole number from {low} to {high}: {str(text)[:40]!r}")
    return value


def parse_float(text: str) -> float:
    """``text`` as a finite float in plain decimal notation (``-12.5``, ``1.7e9``).

    Raises:
        ValueError: anything else: NaN, infinities, ``_``, whitespace, non-ASCII digits, overflow.
    """
    if not isinstance(text, str) or not _FLOAT.fullmatch(text) or not math.isfinite(value := float(text)):
        raise ValueError(f"not a finite decimal number: {str(text)[:40]!r}")
    return value
