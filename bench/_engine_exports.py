"""lpc's engine exports of SmolLM2-135M, shared by bench/modelopt_check.py and bench/vllm_check.py.

Runs in lpc's venv (`make modelopt` / `make vllm` call it with --export-only). Each artifact is written
once under runs/engine-exports/ (an existing stage directory with a manifest is kept). Calibration:
the protocol's calib_tail.txt in CALIB_SAMPLES windows of CALIB_SEQ_LEN tokens (fewer than the
protocol's 128 x 512: these exports check layouts and engines, not quality).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import CALIB, REPO, model_dir  # noqa: E402

ROOT = REPO / "runs" / "engine-exports"
CALIB_SETS = ["calibrate.samples=16", "calibrate.seq_len=256"]
KV = "kv_cache={format: fp8_e4m3, spec: {granularity: tensor}, scales: tensor}"
# artifact -> (recipe, --set overrides, [(export format, directory name)])
ARTIFACTS = {
    "nvfp4": ("nvfp4", ["quantize.weights.spec.scale_search=0"],  # plain amax scales: no calibration needed
              [("compressed-tensors", "ct-nvfp4"), ("dense", "dense-nvfp4")]),
    "fp8": ("fp8", [], [("compressed-tensors", "ct-fp8")]),
    "fp8_tensor_kv": ("fp8", CALIB_SETS + ["quantize.weights.spec.granularity=tensor", KV],
                      [("compressed-tensors", "ct-fp8-kv"), ("modelopt", "mo-fp8-kv")]),
    "nvfp4_w4a4_kv": ("nvfp4_w4a4", CALIB_SETS + [KV], [("modelopt", "mo-nvfp4-w4a4-kv"),
                                                      ("compressed-tensors", "ct-nvfp4-w4a4-kv")]),
    "vapr_vllm": ("vapr", CALIB_SETS + ["allocate.engine=vllm", "allocate.budget_bits=6.0", "allocate.refine=false",
                                        "allocate.pareto_budgets=[]"], [("compressed-tensors", "ct-vapr-vllm")]),
    "int4": ("int4", [], [("compressed-tensors", "ct-int4")]),
}


def _done(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def build(names: list[str] | None = None) -> dict[str, Path]:
    """Write the artifacts (and their exports) named, all by default; returns {directory name: path}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lpc.pipeline import stages
    from lpc.recipes import load_recipe

    src = str(model_dir())
    out = {"model": Path(src)}
    for name in names or list(ARTIFACTS):
        recipe_name, sets, exports = ARTIFACTS[name]
        recipe = load_recipe(recipe_name, sets)
        base = ROOT / name
        calib = plan = None
        if CALIB_SETS[0] in sets:  # the recipes that read statistics (scale search, activations, KV, Fisher)
            calib = base / "calib"
            if not _done(calib):
                stages.calibrate(src, str(CALIB), calib, recipe, overwrite=True)
        if recipe.allocate is not None:
            plan = base / "alloc"
            if not _done(plan):
                stages.allocate(calib, recipe, plan, overwrite=True)
        quant = base / "quant"
        if not _done(quant):
            stages.quantize(src, recipe, quant, calib=calib, plan=plan, overwrite=True)
        out[f"quant-{name}"] = quant
        for fmt, dirname in exports:
            target = ROOT / dirname
            if not _done(target):
                stages.export(quant, target, fmt, overwrite=True)
            out[dirname] = target
    return out
