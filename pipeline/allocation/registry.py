"""Allocation policies: how `lpc allocate` decides which weights keep more precision.

A policy is a function (AllocationContext, staging dir) -> (plan, tensors, summary fields) registered by
name in `ALLOCATION_POLICIES` (`allocate.policy` in a recipe). The plan is {"layers": {name: entry}}
plus policy fields (see allocation/plan.py for the entry format); tensors (block masks, activation
importances) are saved beside it. Adding one: a module that calls `ALLOCATION_POLICIES.add(name, fn)`,
imported in `allocation/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lpc.formats.registry import Registry
from lpc.pipeline.calibration.stats import calibration_batches_of
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.progress import Progress


@dataclass
class AllocationContext:
    """What a policy sees: the original model and its targets, calibration statistics and manifest."""

    model: nn.Module
    targets: dict[str, nn.Linear]
    stats: dict[str, dict[str, torch.Tensor]]
    recipe: Any
    calib_manifest: dict[str, Any]
    src: str
    progress: Progress | None
    calib_dir: Path

    def fisher(self, name: str) -> torch.Tensor:
        s = self.stats.get(name, {})
        if "weight_fisher" not in s:
            raise InputError(f"the calibration has no Fisher statistics for {name}",
                             "calibrate with --fisher (or calibrate.fisher: true in the recipe)")
        return s["weight_fisher"]

    def batches(self) -> list[torch.Tensor]:
        return calibration_batches_of(self.calib_dir, self.src, self.model)


Policy = Callable[[AllocationContext, Path], tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]]

ALLOCATION_POLICIES: Registry[Policy] = Registry("allocation policy", RecipeError)
