"""Allocation policies: how `lpc allocate` decides which weights keep more precision.

A policy is a function (AllocationContext, staging dir) -> (plan, tensors, summary fields) registered by
name in `ALLOCATION_POLICIES` (`allocate.policy` in a recipe). The plan is {"layers": {name: entry}}
plus policy fields (see allocation/plan.py for the entry format); tensors (block masks, activation
importances) are saved beside it. Adding one: a module that calls `ALLOCATION_POLICIES.add(name, fn)`,
imported in `allocation/__init__.py`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lpc.formats.registry import Registry
from lpc.pipeline.calibration.stats import calibration_batches_of
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.progress import Progress

log = logging.getLogger(__name__)


class AllocationContext:
    """What a policy sees: the recipe's targets, calibration statistics and manifest, and the model.

    A checkpoint that streams starts as a meta-device skeleton: `names`, `shape` and `weight` (read from
    the safetensors files one tensor at a time) never load the model, so a policy that only scores
    weights holds one weight at a time. `model` and `targets` load the whole model on first use (policies
    that run forward passes: activation scores, measured losses)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], stats: dict[str, dict[str, torch.Tensor]],
                 recipe: Any, calib_manifest: dict[str, Any], src: str, progress: Progress | None, calib_dir: Path,
                 store: Any = None, load_whole: Callable[[], tuple[nn.Module, dict[str, nn.Linear]]] | None = None):
        self._model, self._targets, self.stats, self.recipe = model, targets, stats, recipe
        self.calib_manifest, self.src, self.progress, self.calib_dir = calib_manifest, src, progress, Path(calib_dir)
        self.store, self._load_whole = store, load_whole  # store: a WeightStore while `model` is a skeleton
        self.names = list(targets)

    def _whole(self) -> None:
        if self.store is not None:
            log.info("allocation: loading the whole model for its forward passes")
            self._model, self._targets = self._load_whole()
            self.store = None

    @property
    def model(self) -> nn.Module:
        self._whole()
        return self._model

    @property
    def targets(self) -> dict[str, nn.Linear]:
        self._whole()
        return self._targets

    def shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a target, without loading it."""
        m = self._targets[name]
        return m.out_features, m.in_features

    def weight(self, name: str) -> torch.Tensor:
        """A target's weight as float32 on CPU: read alone from the checkpoint while streaming."""
        if self.store is not None:
            return self.store.get(f"{name}.weight").float()
        return self._targets[name].weight.detach().float()

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
