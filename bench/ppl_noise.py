"""How far perplexity moves between equally good quantizations of the real model; prints JSON.

    python bench/ppl_noise.py                 # FGMP p=0.3, plain rounding, 16 variants

The FGMP p=0.3 plan of `fgmp_nvfp4a16` is quantized with plain rounding 16 times, each time with
every layer's per-tensor scale multiplied by the same factor m in [1, 2) (m = 1 + i/16). Over
one binade the E4M3 block scales and FP8 values only land on other grid points, so every variant is
as good as any other by construction: its weight error is statistically the same. What moves is
which way each weight happens to round. The spread of heldout perplexity across the variants is the
noise floor of a perplexity comparison on this model; the spread of KL(original || quantized) on
the same text is shown beside it.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LPC_ASSETS", REPO.parent / "shared" / "assets"))


def main() -> None:
    from lpc.formats import get_format
    from lpc.pipeline import stages
    from lpc.pipeline.allocation.plan import read_plan
    from lpc.pipeline.stages.allocate import allocate
    from lpc.pipeline.evaluation.perplexity import kl_divergence, perplexity
    from lpc.pipeline.io.models import find_targets, load_hf_model, load_tokenizer
    from lpc.pipeline.quantization.layers import layer_setups
    from lpc.recipes import load_recipe

    model_dir = ASSETS / "models" / "stories260K"
    heldout = ASSETS / "data" / "tinystories" / "heldout.jsonl"
    recipe = load_recipe("fgmp_nvfp4a16", ["quantize.method=rtn"])
    with tempfile.TemporaryDirectory() as tmp:
        stages.calibrate(str(model_dir), str(ASSETS / "data" / "tinystories" / "calib.jsonl"),
                         Path(tmp) / "calib", recipe)
        allocate(Path(tmp) / "calib", recipe, Path(tmp) / "alloc", model=str(model_dir))
        _, plan, _, _ = read_plan(Path(tmp) / "alloc", recipe)
    tok = load_tokenizer(model_dir)
    original = load_hf_model(model_dir)
    model = load_hf_model(model_dir)
    targets = find_targets(model, recipe.targets, recipe.ignore)
    setups = layer_setups(targets, plan, None, recipe.quantize.fuse_groups)
    weights = {n: m.weight.detach().clone() for n, m in targets.items()}
    rows = []
    for i in range(16):
        mult = 1 + i / 16
        for name, (fmt, spec, ctx) in setups.items():
            c = {**ctx, "global_amax": ctx["global_amax"] * mult}
            targets[name].weight.data.copy_(get_format("fgmp").fake_quantize(weights[name], **spec, **c))
        ppl = perplexity(model, tok, heldout)["perplexity"]
        kl = kl_divergence(model, original, tok, heldout)["kl"]
        rows.append({"scale_multiplier": mult, "perplexity": ppl, "kl": kl})
        print(f"m={mult:.4f} ppl={ppl:.4f} kl={kl:.5f}", file=sys.stderr)
    ppls, kls = [r["perplexity"] for r in rows], [r["kl"] for r in rows]
    summary = {"perplexity": {"min": min(ppls), "max": max(ppls), "stdev": statistics.stdev(ppls)},
               "kl": {"min": min(kls), "max": max(kls), "stdev": statistics.stdev(kls),
                      "relative_stdev": statistics.stdev(kls) / statistics.mean(kls)},
               "perplexity_relative_stdev_of_increase": statistics.stdev(ppls) /
               (statistics.mean(ppls) - perplexity(original, tok, heldout)["perplexity"])}
    json.dump({"model": "stories260K", "plan": "fgmp_nvfp4a16 p=0.3, plain rounding", "rows": rows,
               "summary": summary}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
