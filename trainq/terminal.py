"""Text from outside on a terminal: the one sanitizer every printed string goes through.

A job's name, an error, a log line or an S3 key comes from the API, which took it from a user
or from data. On a terminal such text must print as itself: ``[/]`` as two brackets and a slash
(not Rich markup, which raised ``MarkupError`` and made ``trainq list`` exit 1), ``[link=…]`` as
text (not a hidden hyperlink), ``:smile:`` as text, and an ESC or CR as its escape (never a
colour change, a cursor move or an overwritten line).

* :func:`terminal_text` makes one string safe: control characters written as escapes
  (:func:`shared.sanitize.escape_controls`).
* :class:`SafeConsole` is the Rich console of the CLI and the demo: every string it renders
  (``print`` arguments, table cells) goes through :func:`terminal_text`, with markup, emoji codes
  and highlighting off. Our own styling is given as styles (``style="bold"``), never as markup.
* :func:`write` prints outside text without Rich (log lines, ``error: …``).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from rich.console import Console
from rich.text import Text

from shared.sanitize import escape_controls


def terminal_text(value: object, *, keep_newlines: bool = False) -> str:
    """``str(value)`` with every control character (ESC, CR, BEL, C1…) written as its escape.

    Args:
        keep_newlines: leave ``\\n`` alone (a log, a traceback: several lines on purpose).
    """
    return escape_controls(str(value), keep_newlines=keep_newlines)


def write(text: object, *, file: IO[str] | None = None, end: str = "\n", keep_newlines: bool = False) -> None:
    """Print outside ``text`` (sanitized) to ``file`` (default stdout) and flush."""
    out = file or sys.stdout
    out.write(terminal_text(text, keep_newlines=keep_newlines) + end)
    out.flush()


class SafeConsole(Console):
    """A Rich console on which no string is markup: every ``str`` it renders is sanitized first."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        """Render ``text`` as plain text: controls escaped, markup and emoji codes left as they are."""
        kwargs.update(markup=False, emoji=False, highlight=False)
        return super().render_str(terminal_text(text), **kwargs)


def console(*, stderr: bool = False, width: int | None = None) -> SafeConsole:
    """The console for the CLI's output. Off a terminal (a pipe, a file) it is 200 columns wide
    without colour, so tables are not cut at 80 columns and ids stay whole."""
    made = SafeConsole(stderr=stderr, width=width)
    if not made.is_terminal and width is None:
        made = SafeConsole(stderr=stderr, width=200, no_color=True)
    return made
