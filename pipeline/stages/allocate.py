"""`lpc allocate`: decide which weights keep more precision, with a registered allocation policy
(allocation/registry.py): fgmp / random / magnitude block plans (allocation/blocks.py) or the vapr
per-layer format search (allocation/vapr.py). Writes plan.json, masks.safetensors (and VaPr's
pareto.json / pareto.png); `lpc quantize --plan alloc/` reads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.allocation import ALLOCATION_POLICIES, AllocationContext
from lpc.pipeline.allocation.plan import MASKS, PLAN
from lpc.pipeline.artifact import store as art
from lpc.pipeline.calibration.stored import STATS_FILE, read_stats
from lpc.pipeline.errors import RecipeError
from lpc.pipeline.io.models import find_targets, load_hf_model, model_files
from lpc.pipeline.io.streaming import open_stack
from lpc.pipeline.progress import Progress
from lpc.pipeline.stages.base import StageResult, run_stage
from lpc.recipes.schema import Recipe


def allocate(calib: Path, recipe: Recipe, out: Path, model: str | None = None, overwrite: bool = False,
             progress: Progress | None = None) -> StageResult:
    """Write an allocation plan for the recipe's targets from a calibration artifact (of `model`, by
    default the model the calibration was made from)."""
    if recipe.allocate is None:
        raise RecipeError(f"recipe {recipe.name} has no allocate section",
                          "use an allocation recipe (fgmp_nvfp4, fgmp_nvfp4a16, vapr) or add one")
    policy = ALLOCATION_POLICIES.get(recipe.allocate.policy)
    cm = art.read_checked_manifest(calib, "calibrate")
    src = model or cm["config"]["model"]
    a = recipe.allocate
    config = {"model": src, "calib": str(calib), "allocate": a.model_dump(mode="json"),
              "quantize": recipe.quantize.model_dump(mode="json"), "targets": recipe.targets, "ignore": recipe.ignore}

    def body(tmp: Path) -> dict[str, Any]:
        def whole():
            m = load_hf_model(src)
            return m, find_targets(m, recipe.targets, recipe.ignore)

        opened = open_stack(src, recipe.targets, recipe.ignore, "allocating")
        if opened is not None:  # a skeleton: weights are read one at a time, the model loads only if a policy runs it
            skel, store, _ = opened
            ctx = AllocationContext(skel, find_targets(skel, recipe.targets, recipe.ignore), read_stats(calib), recipe,
                                    cm, src, progress, Path(calib), store=store, load_whole=whole)
        else:
            ctx = AllocationContext(*whole(), read_stats(calib), recipe, cm, src, progress, Path(calib))
        plan, tensors, extra = policy(ctx, tmp)
        art.save_tensors(tensors or {"_empty": torch.zeros(1)}, tmp / MASKS)
        art.write_json(tmp / PLAN, plan)
        return {"recipe": recipe.model_dump(mode="json"), "layers": plan["layers"],
                "summary": {"policy": a.policy, **extra}, "bits_per_weight": extra.get("bits_per_weight")}

    return run_stage("allocate", out, model_files(src) + [Path(calib) / STATS_FILE], config, overwrite, body)
