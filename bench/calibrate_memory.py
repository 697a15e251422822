"""Peak RSS of calibration against model depth: streamed (one decoder layer resident) vs whole model.

    python bench/calibrate_memory.py [--layers 8 32] [--hidden 512]

Builds random Llamas of the given depths (fp32, saved as safetensors), then, each in a fresh process,
runs `lpc calibrate`'s statistics on 8 sequences of 128 tokens either streamed from the checkpoint or
on the model loaded whole. Prints JSON: params, checkpoint MB, peak RSS MB of each mode.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, torch
from lpc.pipeline.calibration.stats import collect_input_stats
from lpc.pipeline.io.models import find_targets, load_hf_model
from lpc.pipeline.io.streaming import open_for_calibration
model_dir, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
batches = [torch.randint(3, 500, (1, 128)) for _ in range(8)]
if mode == "streamed":
    model, store = open_for_calibration(model_dir, ["*"], ["lm_head"])
else:
    model, store = load_hf_model(model_dir), None
collect_input_stats(model, batches, find_targets(model, ["*"], ["lm_head"]), store=store)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def build(path: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(path), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.layers:
            d = Path(tmp) / f"l{n}"
            params = build(d, n, args.hidden)
            row = {"layers": n, "params": params,
                   "checkpoint_mb": round((d / "model.safetensors").stat().st_size / 2**20, 1)}
            for mode in ("streamed", "whole"):
                out = subprocess.run([sys.executable, "-c", CHILD, str(d), mode], capture_output=True, text=True,
                                     check=True)
                row[f"peak_rss_mb_{mode}"] = round(float(out.stdout.strip().splitlines()[-1]), 1)
            rows.append(row)
    json.dump({"hidden": args.hidden, "rows": rows}, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
