"""Text from a task, made safe to show a person.

A task's log lines and errors are written by whatever code the task runs, and
a terminal obeys the control sequences in what it prints: a line holding ESC
can set the window title, clear the screen or plant a hyperlink, and a
bidirectional override can make a line read differently than it is. So what is
shown of such text escapes every control and format character except a line
break and a tab, the same way in the CLI and on the dashboard.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

_KEPT = frozenset("\n\t")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with its control and format characters (ESC, CR, BEL, DEL,
    bidirectional overrides, line and paragraph separators) written as
    ``\\x1b`` or ``\\u202e`` escapes; line breaks and tabs are kept."""
    if text.isprintable():
        return text
    return "".join(
        char
        if char in _KEPT or unicodedata.category(char) not in ("Cc", "Cf", "Zl", "Zp")
        else _escape(char)
        for char in text
    )
