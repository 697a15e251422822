"""Exporters: the lpc artifact written in the layout an engine or library loads (one module each)."""
from lpc.pipeline.export.registry import EXPORTERS, Exporter

# One import line per exporter: importing registers it.
from lpc.pipeline.export import lpc  # noqa: E402,F401
from lpc.pipeline.export import dense  # noqa: E402,F401
from lpc.pipeline.export import peft  # noqa: E402,F401
from lpc.pipeline.export import compressed_tensors  # noqa: E402,F401
from lpc.pipeline.export import auto  # noqa: E402,F401
from lpc.pipeline.export import modelopt  # noqa: E402,F401

__all__ = ["EXPORTERS", "Exporter"]
