"""Exporters: how an lpc artifact becomes a deployable model directory.

An exporter is a function (src artifact dir, staging dir) -> summary fields, registered by name in
`EXPORTERS` (`lpc export --format NAME`, `export.format` in a recipe). Adding one: a module that calls
`EXPORTERS.add(name, fn)`, imported in `export/__init__.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lpc.formats.registry import Registry
from lpc.pipeline.errors import InputError

Exporter = Callable[[Path, Path], dict[str, Any]]

EXPORTERS: Registry[Exporter] = Registry("export format", InputError)
