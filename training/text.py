"""Text that came from data (class names, labels, file names, a step's error message), made safe for a terminal.

A class folder named `cat\\x1b]0;pwned\\x07` would retitle the user's terminal, one holding a newline would
forge a line of the run summary (`FAKE: test accuracy 1.0000`), and a bidirectional override reverses what
follows it. Everything `microfed` prints that did not come from its own format strings passes through
`printable`; files and manifests keep the exact text.
"""

from __future__ import annotations

import unicodedata

__all__ = ["is_printable", "printable"]


def printable(text: object, max_chars: int | None = None) -> str:
    """`text` with every character a terminal could act on shown as a Python escape.

    Escaped: control characters (C0, DEL, C1: escape sequences, newlines, carriage returns, tabs, BEL), format
    characters (bidirectional overrides, zero-width joiners), surrogates, private-use and unassigned code points,
    and separators other than the plain space (line/paragraph separators, no-break spaces). Letters, digits,
    punctuation and symbols of any script stay as they are, so ordinary names print unchanged. With
    `max_chars`, a longer result keeps its start and end around an ellipsis.
    """
    shown = "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch
        for ch in str(text)
    )
    if max_chars is None or len(shown) <= max_chars:
        return shown
    half = max(1, (max_chars - 1) // 2)
    return f"{shown[:half]}…{shown[-half:]}"


def is_printable(text: str) -> bool:
    """Whether `printable` leaves `text` as it is (no character in it needs escaping)."""
    return printable(text) == text
