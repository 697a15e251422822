"""Errors of the pipeline. All subclass `LpcError`; the CLI maps them to a red line and an exit code."""
from __future__ import annotations

from lpc.formats.errors import FormatError, LpcError
from lpc.recipes import RecipeError


class InputError(LpcError):
    """A missing or unreadable file, a bad model directory, bad data."""


class ArtifactError(LpcError):
    """An artifact directory that is broken, incomplete, or not what the stage expects."""


class GateFailed(LpcError):
    """An evaluation gate (`--fail-under-recovery`) failed."""

    exit_code = 3


__all__ = ["ArtifactError", "FormatError", "GateFailed", "InputError", "LpcError", "RecipeError"]
