"""Text that crosses a trust boundary: errors shown to users, and lines written to logs.

* :func:`public_message` turns an infrastructure exception into a message for a job record or an
  HTTP response: "storage unreachable" or "job store unavailable", never the internal S3 endpoint
  URL or Redis ``host:port`` (those stay in the server's log, which also gets the traceback).
* :func:`escape_controls` and :class:`EscapeControlsFilter` keep names taken from data (S3 keys,
  class folders, CSV columns) from writing raw ESC, CR or LF into a log: a key like
  ``"x\\r\\nERROR forged line"`` is logged as ``x\\r\\nERROR forged line`` on one line.
"""

from __future__ import annotations

import logging
import re

import redis
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

#: C0 and C1 control characters (and DEL): what a terminal or a log reader may interpret.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# URLs of services (not s3:// URIs, which name the user's own data) and bare IPv4 host:port.
_SERVICE_URL = re.compile(r"(?i)\b(?:https?|rediss?|unix|amqp)://[^\s'\"<>]+")
_HOST_PORT = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}:\d{1,5}\b")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as its escape (``\\x1b``, ``\\r``, ``\\n``).

    Args:
        keep_newlines: leave ``\\n`` alone (a traceback's own line breaks).
    """

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return repr(char)[1:-1]

    return CONTROL_CHARS.sub(escape, text)


def public_message(exc: BaseException) -> str:
    """A message about ``exc`` fit for a user: no endpoint URLs, hosts or ports.

    S3 connection failures (botocore's ``EndpointConnectionError``, timeouts, closed connections)
    become ``storage unreachable (<type>)``; Redis connection failures ``job store unavailable
    (<type>)``; any other error keeps its type and message with service URLs and ``ip:port``
    replaced by ``<endpoint>``. Log the exception itself where the details are needed.
    """
    kind = type(exc).__name__
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return f"storage unreachable ({kind})"
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"job store unavailable ({kind})"
    text = _HOST_PORT.sub("<endpoint>", _SERVICE_URL.sub("<endpoint>", str(exc)))
    return f"{kind}: {text}" if text else kind


class EscapeControlsFilter(logging.Filter):
    """A handler filter that escapes control characters in each record's message and traceback.

    Install it on a handler (not a logger: a logger's filters skip records propagated from its
    children). The record is rewritten once, so every handler after it sees the escaped text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if CONTROL_CHARS.search(message):
            record.msg, record.args = escape_controls(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and CONTROL_CHARS.search(record.exc_text.replace("\n", "")):
            record.exc_text = escape_controls(record.exc_text, keep_newlines=True)
        return True


def install_log_escaping(logger: logging.Logger) -> None:
    """Add an :class:`EscapeControlsFilter` to every handler of ``logger`` (once each)."""
    for handler in logger.handlers:
        if not any(isinstance(existing, EscapeControlsFilter) for existing in handler.filters):
            handler.addFilter(EscapeControlsFilter())
