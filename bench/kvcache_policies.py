"""KV cache policies on SmolLM2-135M-Instruct long generations: JSON per prompt x policy x budget.

Prompts: the first sentences of eval_head.txt paragraphs and "think step by step" arc_easy / obqa
questions (chat template). The full-cache greedy continuation (`--tokens` long) is the reference.
Per policy and budget (a fraction of the bf16 KV bytes of prompt + continuation, scales and
metadata counted), through lpc's PolicyCache and token-by-token decoder:
(a) teacher-forced NLL/perplexity of the reference continuation and KL(full || compressed), the cache
    compressed as decoding proceeds (`--chunk` tokens per forward, the policy acting between forwards:
    a CPU-time saving; within a chunk its tokens are read at full precision); (b) greedy agreement: the share of the first `--agree` generated
    tokens equal to the reference's. Memory: the most bytes held between steps against the budget and
    the bf16 cache. Cost: seconds per token of the decode and the policy's share of it.
ThinKV's sparsity thresholds are the tertiles of the segment sparsities of calib_tail.txt windows.

    python bench/kvcache_policies.py [--tokens 512] [--agree 48] [--chunk 16] [--prompts 2] [--budgets 0.05,0.1,0.2,0.4]
Rows go to stdout and bench/results/kvcache_policies.jsonl; the plot to bench/results/pictures/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import CALIB, EVAL, MC, model_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = [("thinkv", {}), ("streaming", {}), ("h2o", {}), ("uniform", {"level": "fp8"}),
            ("uniform", {"level": "nvfp4"}), ("uniform", {"level": "int4"}), ("uniform", {"level": "int2"})]
ABLATIONS = [("thinkv", {"evict_on_transition": False})]  # only with --only


def label(name: str, opts: dict) -> str:
    if "level" in opts:
        return f"{name}-{opts['level']}"
    return f"{name}-no-transition-eviction" if opts.get("evict_on_transition") is False else name


def prompts(tok, n: int) -> list[tuple[str, list[int]]]:
    """Alternating: a wiki paragraph's first sentence (plain text), a step-by-step question (chat)."""
    paras = [p.strip() for p in EVAL.read_text(encoding="utf-8").split("\n") if len(p.strip()) > 200
             and not p.strip().startswith("=")]
    wiki = [p.split(" . ")[0] + " ." for p in paras[::7]]
    qs = []
    for fname, stem in (("arc_easy_test.jsonl", "question"), ("openbookqa_test.jsonl", "question_stem")):
        for line in (MC / fname).read_text().splitlines()[:3]:
            r = json.loads(line)
            opts = " ".join(f"({a}) {t}" for a, t in zip(r["choices"]["label"], r["choices"]["text"]))
            qs.append(f"{r[stem]} {opts}\nThink step by step, then give the answer.")
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append((f"wiki{i // 2}", tok(wiki[i // 2])["input_ids"]))
        else:
            msgs = [{"role": "user", "content": qs[i // 2]}]
            out.append((f"question{i // 2}", tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                     return_dict=True)["input_ids"]))
    return out


def thresholds(model, tok, group: int, windows: int = 2, seq_len: int = 512) -> tuple[float, float]:
    """ThinKV's sparsity thresholds from calib_tail.txt windows (never the evaluated text)."""
    from lpc.pipeline.kvcache.thinkv import calibrate_thresholds

    ids = tok(CALIB.read_text(encoding="utf-8")[:200_000])["input_ids"]
    return calibrate_thresholds(model, [ids[w * seq_len:(w + 1) * seq_len] for w in range(windows)], group)


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lpc.pipeline.kvcache.decode import decode, use_eager_attention
    from lpc.pipeline.kvcache.levels import token_bytes
    from lpc.pipeline.kvcache.policy import make_policy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--agree", type=int, default=48)
    ap.add_argument("--chunk", type=int, default=16, help="teacher-forced tokens per forward in (a)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--only", default="", help="comma-separated policy labels (default all)")
    ap.add_argument("--out", default=str(RESULTS / "kvcache_policies.jsonl"))
    ap.add_argument("--summarize", action="store_true", help="only summarize and plot the rows already in --out")
    args = ap.parse_args()
    if args.summarize:
        rows = [json.loads(x) for x in Path(args.out).read_text().splitlines() if x.strip()]
        return summarize([r for r in rows if "policy" in r], sorted({r["budget"] for r in rows if "policy" in r}))
    torch.manual_seed(0)
    src = model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    use_eager_attention(model)
    cfg = model.config
    per_token_bf16 = token_bytes("bf16", cfg.num_key_value_heads, cfg.head_dim) * cfg.num_hidden_layers
    th = thresholds(model, tok, group=32)
    print(json.dumps({"thinkv_thresholds": th, "source": "calib_tail.txt tertiles"}), flush=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen = [p for p in POLICIES + ABLATIONS if (not args.only and p in POLICIES) or label(*p) in args.only.split(",")]
    rows = []
    out = open(args.out, "w")

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    for pid, prompt in prompts(tok, args.prompts):
        cap = len(prompt) + args.tokens
        full = decode(model, prompt, make_policy("streaming", 1.0), cap, args.tokens, keep_logprobs=True)
        ref, ref_lp = full.tokens, full.logprobs
        emit({"prompt": pid, "policy": "full", "budget": 1.0, "prompt_tokens": len(prompt), "tokens": args.tokens,
              "ppl": math.exp(full.nll / args.tokens), "kl": 0.0, "agreement": 1.0,
              "peak_bytes": full.peak_bytes, "bf16_bytes": cap * per_token_bf16,
              "s_per_token": full.seconds / args.tokens, "text": tok.decode(ref[:200])})
        for name, opts in chosen:
            for b in budgets:
                pol = make_policy(name, b, **({"thresholds": th} if name == "thinkv" else {}), **opts)
                a = decode(model, prompt, pol, cap, args.tokens, forced=ref, reference=ref_lp,
                           chunk=args.chunk)
                g = decode(model, prompt, make_policy(name, b, **({"thresholds": th} if name == "thinkv" else {}),
                                                      **opts), cap, args.agree)
                same = sum(x == y for x, y in zip(g.tokens, ref[:args.agree])) / args.agree
                emit({"prompt": pid, "policy": label(name, opts), "budget": b, "tokens": args.tokens,
                      "ppl": math.exp(a.nll / args.tokens),
                      "ppl_increase_pct": 100 * (math.exp((a.nll - full.nll) / args.tokens) - 1),
                      "kl": a.kl / args.tokens, "agreement": same, "peak_bytes": a.peak_bytes,
                      "budget_bytes": int(pol.budget_bytes * cfg.num_hidden_layers),
                      "bf16_bytes": cap * per_token_bf16, "held_fraction": a.peak_bytes / (cap * per_token_bf16),
                      "s_per_token": g.seconds / args.agree, "policy_ms_per_token": 1000 * g.policy_seconds / args.agree,
                      "held_tokens_layer0": a.held_tokens[-1]})
    out.close()
    summarize(rows, budgets)


def summarize(rows: list[dict], budgets: list[float]) -> None:
    """Mean over prompts per policy and budget (JSON lines) and the quality-vs-budget plot."""
    import statistics

    agg = {}
    for r in rows:
        if r["policy"] != "full":
            agg.setdefault((r["policy"], r["budget"]), []).append(r)
    summary = [{"summary": pol, "budget": b, "ppl_increase_pct": statistics.mean(x["ppl_increase_pct"] for x in rs),
                "kl": statistics.mean(x["kl"] for x in rs), "agreement": statistics.mean(x["agreement"] for x in rs),
                "held_fraction": max(x["held_fraction"] for x in rs), "prompts": len(rs)}
               for (pol, b), rs in sorted(agg.items())]
    for s in summary:
        print(json.dumps(s), flush=True)
    if os.environ.get("KVCACHE_BENCH_NO_SUMMARY_FILES"):  # an ablation run keeps the main run's files
        return
    (RESULTS / "kvcache_policies_summary.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pol in sorted({s["summary"] for s in summary}):
        pts = [s for s in summary if s["summary"] == pol]
        style = dict(marker="o", lw=2.5 if pol == "thinkv" else 1.2)
        axes[0].plot([100 * s["budget"] for s in pts], [max(s["ppl_increase_pct"], 1e-2) for s in pts], label=pol, **style)
        axes[1].plot([100 * s["budget"] for s in pts], [100 * s["agreement"] for s in pts], label=pol, **style)
    axes[0].set(xlabel="KV budget (% of bf16 bytes)", ylabel="perplexity increase on the reference (%)", yscale="log")
    axes[1].set(xlabel="KV budget (% of bf16 bytes)", ylabel="greedy agreement with the full cache (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: KV cache policies at a byte budget (bench/kvcache_policies.py)")
    fig.tight_layout()
    (RESULTS / "pictures").mkdir(exist_ok=True)
    fig.savefig(RESULTS / "pictures" / "kvcache_policies.png", dpi=110)


if __name__ == "__main__":
    main()
