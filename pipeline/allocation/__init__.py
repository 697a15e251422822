"""Precision allocation: policies that decide which weights keep more precision (one module each)."""
from lpc.pipeline.allocation.registry import ALLOCATION_POLICIES, AllocationContext, Policy

# One import line per policy module: importing registers it.
from lpc.pipeline.allocation import blocks  # noqa: E402,F401  (fgmp, random, magnitude)
from lpc.pipeline.allocation import vapr  # noqa: E402,F401

__all__ = ["ALLOCATION_POLICIES", "AllocationContext", "Policy"]
