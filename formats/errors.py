"""The one error family of lpc. Every error meant for a user subclasses `LpcError`."""
from __future__ import annotations


class LpcError(Exception):
    """A problem with the user's input: `str(err)` says what is wrong, `hint` how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base


class FormatError(LpcError):
    """An unknown format, a bad format spec, or a tensor a format cannot hold."""
