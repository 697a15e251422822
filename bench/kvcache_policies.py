"""KV cache policies on SmolLM2-135M-Instruct long generations: JSON per prompt x policy x budget.

Prompts (`--prompts`, alternating): the first sentence of eval_head.txt wiki paragraphs (plain text) and
"think step by step" arc_easy / openbookqa questions (chat template). The full-cache greedy
continuation (`--tokens` long) is the reference. Per policy and budget (a fraction of the bf16 KV bytes
of prompt + continuation, scales and metadata counted), through lpc's PolicyCache and decoder:
(a) teacher-forced NLL/perplexity of the reference continuation and KL(full || compressed), the cache
    compressed as decoding proceeds (`--chunk` tokens per forward, the policy acting between forwards;
    within a chunk its tokens are read as written);
(b) greedy agreement: the share of the first `--agree` generated tokens equal to the reference's;
(c) arc_easy accuracy with the answer after the model's own reasoning: `--arc` questions (lines
    `--arc-from`.. of arc_easy_test.jsonl, chat template, "think step by step"), `--reason` greedy tokens
    of reasoning with the compressed cache, then "The answer is (" and the most likely of the choice
    letters; under each policy at `--arc-budget` and with the full cache.
Memory: the most bytes held between steps against the budget and the bf16 cache. Cost: seconds per
decoded token (plain DynamicCache, the PolicyCache at full budget, each policy) and the policy's share.
ThinKV's sparsity thresholds are the tertiles of the segment sparsities of calib_tail.txt windows.
`--tune` runs (a) on held-out prompts instead (calib_tail.txt openings and arc_challenge questions),
for choosing options without looking at the evaluated prompts.

    python bench/kvcache_policies.py [--tokens 512] [--agree 32] [--prompts 6] [--arc 40] [--tune]
Rows go to stdout and bench/results/kvcache_policies.jsonl (or --out X.jsonl); the summary to
X_summary.json beside it and the plot to bench/results/pictures/X.png.
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
ARC_POLICIES = [("thinkv", {}), ("streaming", {}), ("h2o", {}), ("uniform", {"level": "int4"}),
                ("uniform", {"level": "int2"})]
TUNE = [("thinkv", {"recent": r}) for r in (0, 1, 2, 4)] + [("thinkv", {"ladder": ["bf16", "fp8", "nvfp4", "int2"]})] + [
    ("thinkv", {"demote": "direct"}), ("thinkv", {"floor": "int4"}), ("thinkv", {"floor": "int4", "demote": "direct"})]


def label(name: str, opts: dict) -> str:
    if "level" in opts:
        return f"{name}-{opts['level']}"
    return name + "".join(f"-{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in sorted(opts.items()))


def question(r: dict, stem: str = "question") -> str:
    opts = " ".join(f"({a}) {t}" for a, t in zip(r["choices"]["label"], r["choices"]["text"]))
    return f"{r[stem]} {opts}\nThink step by step, then give the answer."


def chat(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]


def prompts(tok, n: int, tune: bool = False) -> list[tuple[str, list[int]]]:
    """Alternating: a wiki paragraph's first sentence (plain text), a step-by-step question (chat).
    Evaluated: eval_head.txt and arc_easy/openbookqa; held out (`tune`): calib_tail.txt and arc_challenge."""
    text = (CALIB if tune else EVAL).read_text(encoding="utf-8")[: 2_000_000 if tune else None]
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 200 and not p.strip().startswith("=")]
    wiki = [p.split(" . ")[0] + " ." for p in paras[::7]]
    files = [("arc_challenge_test.jsonl", "question")] if tune else \
        [("arc_easy_test.jsonl", "question"), ("openbookqa_test.jsonl", "question_stem")]
    qs = [question(json.loads(line), stem) for i in range(3) for fname, stem in files
          for line in (MC / fname).read_text().splitlines()[i:i + 1]]
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append((f"wiki{i // 2}", tok(wiki[i // 2])["input_ids"]))
        else:
            out.append((f"question{i // 2}", chat(tok, qs[i // 2])))
    return out


def thresholds(model, tok, group: int, windows: int = 2, seq_len: int = 512) -> tuple[float, float]:
    """ThinKV's sparsity thresholds from calib_tail.txt windows (never the evaluated text)."""
    from lpc.pipeline.kvcache.thinkv import calibrate_thresholds

    ids = tok(CALIB.read_text(encoding="utf-8")[:200_000])["input_ids"]
    return calibrate_thresholds(model, [ids[w * seq_len:(w + 1) * seq_len] for w in range(windows)], group)


def plain_seconds_per_token(model, prompt: list[int], steps: int) -> float:
    """Greedy decoding with transformers' own DynamicCache (same eager attention): the baseline cost."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache, feed = DynamicCache(), list(prompt)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True)
            feed = [int(out.logits[0, -1].argmax())]
    return (time.perf_counter() - t0) / steps


def arc_accuracy(model, tok, name: str, opts: dict, budget: float, args, th) -> dict:
    """(c): reasoning with the compressed cache, then the answer letter the model finds most likely."""
    import torch

    from lpc.pipeline.kvcache.decode import decode, step
    from lpc.pipeline.kvcache.policy import make_policy

    rows = [json.loads(x) for x in (MC / "arc_easy_test.jsonl").read_text().splitlines()]
    rows = rows[args.arc_from:args.arc_from + args.arc]
    suffix = tok("\nThe answer is (", add_special_tokens=False)["input_ids"]
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    right, seconds = 0, 0.0
    for r in rows:
        prompt = chat(tok, question(r))
        pol = make_policy(name, budget, **({"thresholds": th} if name == "thinkv" else {}), **opts)
        t0 = time.perf_counter()
        res = decode(model, prompt, pol, len(prompt) + args.reason + len(suffix) + 1, args.reason, stop=stop)
        reasoning = [t for t in res.tokens if t not in stop]
        logits, _ = step(model, res.cache, [res.tokens[-1]] + suffix if reasoning == res.tokens else suffix)
        seconds += time.perf_counter() - t0
        letters = [tok(x, add_special_tokens=False)["input_ids"][0] for x in r["choices"]["label"]]
        pick = r["choices"]["label"][int(torch.argmax(logits[-1, letters]))]
        right += pick == r["answerKey"]
    return {"arc": label(name, opts) if budget < 1 else "full", "budget": budget, "questions": len(rows),
            "accuracy": right / len(rows), "reason_tokens": args.reason, "chance": 0.25,
            "questions_from": f"arc_easy_test.jsonl lines {args.arc_from}-{args.arc_from + len(rows) - 1}",
            "seconds": round(seconds, 1)}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lpc.pipeline.kvcache.decode import decode, use_eager_attention
    from lpc.pipeline.kvcache.levels import token_bytes
    from lpc.pipeline.kvcache.policy import make_policy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--agree", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=32, help="teacher-forced tokens per forward in (a)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--arc", type=int, default=40, help="arc_easy questions for (c); 0 skips (c)")
    ap.add_argument("--arc-from", type=int, default=100)
    ap.add_argument("--arc-budget", type=float, default=0.1)
    ap.add_argument("--reason", type=int, default=48, help="greedy reasoning tokens before the answer in (c)")
    ap.add_argument("--only", default="", help="comma-separated policy labels (default all)")
    ap.add_argument("--tune", action="store_true", help="held-out prompts, ThinKV option variants, (a) only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", action="store_true", help="only summarize and plot the rows already in --out")
    args = ap.parse_args()
    out_path = Path(args.out or RESULTS / ("kvcache_policies_tune.jsonl" if args.tune else "kvcache_policies.jsonl"))
    if args.summarize:
        rows = [json.loads(x) for x in out_path.read_text().splitlines() if x.strip()]
        return summarize(rows, out_path, plot=not args.tune)
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    src = model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    use_eager_attention(model)
    cfg = model.config
    per_token_bf16 = token_bytes("bf16", cfg.num_key_value_heads, cfg.head_dim) * cfg.num_hidden_layers
    th = thresholds(model, tok, group=32)
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen = POLICIES if not args.tune else TUNE + [("uniform", {"level": "int4"}), ("uniform", {"level": "int2"})]
    chosen = [p for p in chosen if not args.only or label(*p) in args.only.split(",")]
    rows = []
    out = open(out_path, "w")

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    emit({"thinkv_thresholds": th, "source": "calib_tail.txt tertiles", "tokens": args.tokens, "chunk": args.chunk,
          "agree": args.agree, "model": "SmolLM2-135M-Instruct, fp32 compute, CPU",
          "threads": torch.get_num_threads()})
    for pid, prompt in prompts(tok, args.prompts, args.tune):
        cap = len(prompt) + args.tokens
        full = decode(model, prompt, make_policy("streaming", 1.0), cap, args.tokens, keep_logprobs=True)
        ref, ref_lp = full.tokens, full.logprobs
        emit({"prompt": pid, "policy": "full", "budget": 1.0, "prompt_tokens": len(prompt), "tokens": args.tokens,
              "ppl": math.exp(full.nll / args.tokens), "kl": 0.0, "agreement": 1.0, "peak_bytes": full.peak_bytes,
              "bf16_bytes": cap * per_token_bf16, "s_per_token": full.seconds / args.tokens,
              "plain_s_per_token": plain_seconds_per_token(model, prompt, 64), "text": tok.decode(ref[:200])})
        for name, opts in chosen:
            for b in budgets:
                make = lambda: make_policy(name, b, **({"thresholds": th} if name == "thinkv" else {}), **opts)  # noqa: E731
                pol = make()
                a = decode(model, prompt, pol, cap, args.tokens, forced=ref, reference=ref_lp, chunk=args.chunk)
                row = {"prompt": pid, "policy": label(name, opts), "budget": b, "tokens": args.tokens,
                       "ppl": math.exp(a.nll / args.tokens),
                       "ppl_increase_pct": 100 * (math.exp((a.nll - full.nll) / args.tokens) - 1),
                       "kl": a.kl / args.tokens, "peak_bytes": a.peak_bytes,
                       "budget_bytes": int(pol.budget_bytes * cfg.num_hidden_layers), "bf16_bytes": cap * per_token_bf16,
                       "held_fraction": a.peak_bytes / (cap * per_token_bf16), "held_tokens_layer0": a.held_tokens[-1],
                       "teacher_forced_s_per_token": a.seconds / args.tokens}
                if args.agree:
                    g = decode(model, prompt, make(), cap, args.agree)
                    row.update(agreement=sum(x == y for x, y in zip(g.tokens, ref[:args.agree])) / args.agree,
                               s_per_token=g.seconds / args.agree, policy_ms_per_token=1000 * g.policy_seconds / args.agree)
                emit(row)
    if args.arc and not args.tune:
        emit(arc_accuracy(model, tok, "streaming", {}, 1.0, args, th))
        for name, opts in [p for p in ARC_POLICIES if not args.only or label(*p) in args.only.split(",")]:
            emit(arc_accuracy(model, tok, name, opts, args.arc_budget, args, th))
    out.close()
    summarize(rows, out_path, plot=not args.tune)


def summarize(rows: list[dict], out_path: Path, plot: bool = True) -> None:
    """Mean over prompts per policy and budget (JSON lines) and the quality-vs-budget plot, named after the
    rows' file (`X.jsonl` -> `X_summary.json` beside it and `pictures/X.png` under bench/results/)."""
    import statistics

    agg = {}
    for r in rows:
        if r.get("policy") not in (None, "full"):
            agg.setdefault((r["policy"], r["budget"]), []).append(r)
    mean = lambda rs, k: statistics.mean(x[k] for x in rs) if all(k in x for x in rs) else None  # noqa: E731
    summary = [{"summary": pol, "budget": b, "prompts": len(rs), "ppl_increase_pct": mean(rs, "ppl_increase_pct"),
                "kl": mean(rs, "kl"), "agreement": mean(rs, "agreement"),
                "held_fraction": max(x["held_fraction"] for x in rs),
                "within_budget": all(x["peak_bytes"] <= x["budget_bytes"] for x in rs),
                "s_per_token": mean(rs, "s_per_token"), "policy_ms_per_token": mean(rs, "policy_ms_per_token")}
               for (pol, b), rs in sorted(agg.items())]
    summary += [r for r in rows if "arc" in r]
    for s in summary:
        print(json.dumps(s), flush=True)
    if not plot or os.environ.get("KVCACHE_BENCH_NO_SUMMARY_FILES"):
        return
    out_path.with_name(out_path.stem + "_summary.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    curves = [s for s in summary if "summary" in s]
    for pol in sorted({s["summary"] for s in curves}):
        pts = [s for s in curves if s["summary"] == pol]
        style = dict(marker="o", lw=2.5 if pol == "thinkv" else 1.2)
        axes[0].plot([100 * s["budget"] for s in pts], [max(s["kl"], 1e-4) for s in pts], label=pol, **style)
        axes[1].plot([100 * s["budget"] for s in pts], [100 * (s["agreement"] or 0) for s in pts], label=pol, **style)
    axes[0].set(xlabel="KV budget (% of bf16 bytes)", ylabel="KL(full || policy) per token, teacher-forced", yscale="log")
    axes[1].set(xlabel="KV budget (% of bf16 bytes)", ylabel="greedy agreement with the full cache (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: KV cache policies at a byte budget (bench/kvcache_policies.py)")
    fig.tight_layout()
    (RESULTS / "pictures").mkdir(exist_ok=True)
    fig.savefig(RESULTS / "pictures" / f"{out_path.stem}.png", dpi=110)


if __name__ == "__main__":
    main()
