"""The one exception type users see: what is wrong and what to do about it."""

from __future__ import annotations

__all__ = ["MicrofedError"]


class MicrofedError(ValueError):
    """Bad input or an unrecoverable condition, with a message that names the file, field or flag.

    `hint` says what to do; the CLI prints message and hint on one line each, without a traceback.
    """

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message if not hint else f"{message} ({hint})")
        self.message = message
        self.hint = hint
