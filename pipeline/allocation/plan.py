"""The allocation artifact: alloc/plan.json (per layer: format, spec, mask reference, activation entry)
and alloc/masks.safetensors (block masks, activation importances), and how quantize reads it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lpc.pipeline.artifact import store as art
from lpc.pipeline.calibration.stored import StatRef, read_stats, stat_names
from lpc.pipeline.errors import ArtifactError
from lpc.recipes import validate_recipe
from lpc.recipes.schema import Recipe

PLAN, MASKS = "plan.json", "masks.safetensors"


def plan_recipe(alloc: Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe an allocation artifact was made with (from its manifest), with `--set` overrides."""
    from lpc.recipes import apply_overrides

    data = art.read_manifest(alloc, "allocate").get("recipe")
    if data is None:
        from lpc.pipeline.errors import ArtifactError
        raise ArtifactError(f"{alloc}/manifest.json holds no recipe", "re-run lpc allocate with this version of lpc")
    return validate_recipe(apply_overrides(data, overrides or []), f"the recipe of {alloc}")


def read_plan(alloc: Path, recipe: Recipe | None = None) -> tuple[Recipe, dict[str, Any], list[Path], Path | None]:
    """An allocation artifact -> (recipe, per-layer plan for the quantize stage, files it depends on,
    the calibration directory it was made from).

    The recipe is the one the plan was made with (stored in its manifest) unless `recipe` is given.

    Plan entries: {"format", "spec", "context": {mask, importance}, "activation": {...}?}; an entry
    of None keeps the layer unquantized.
    """
    m = art.read_checked_manifest(alloc, "allocate")
    if recipe is None:
        recipe = validate_recipe(m["recipe"], f"the recipe stored in {alloc}/manifest.json")
    plan = json.loads((Path(alloc) / PLAN).read_text())
    tensors = art.load_tensors(Path(alloc) / MASKS)
    needs_stats = any(isinstance(e, dict) and e.get("importance") for e in plan["layers"].values())
    stats = read_stats(m["config"]["calib"]) if needs_stats else {}
    acts = (plan.get("activations") or {}).get("layers", {})
    layer_plan: dict[str, Any] = {}
    for name, e in plan["layers"].items():
        if e is None:
            layer_plan[name] = None
            continue
        ctx: dict[str, Any] = {}
        if e.get("mask"):
            ctx["mask"] = tensors[e["mask"]].bool()
        if e.get("codebook"):
            ctx["codebook"] = tensors[e["codebook"]]
        if e.get("importance"):
            if e["importance"] not in stat_names(stats, name):
                raise ArtifactError(f"the calibration of {alloc} has no {e['importance']} for {name}",
                                    "re-run lpc calibrate with the allocation's recipe, then lpc allocate")
            ctx["importance"] = StatRef(stats, name, e["importance"])  # read when the layer is quantized
        layer_plan[name] = {"format": e["format"], "spec": e["spec"], "context": ctx}
        if name in acts:
            layer_plan[name]["activation"] = acts[name]
    aux = {k: v for k, v in tensors.items() if k.startswith("lpc.")}
    if aux:
        layer_plan["__aux__"] = aux
    calib = m["config"].get("calib")
    return recipe, layer_plan, [Path(alloc) / PLAN, Path(alloc) / MASKS], Path(calib) if calib else None
