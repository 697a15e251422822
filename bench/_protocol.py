"""The SmolLM2 protocol shared by bench/smollm2.py and bench/peers.py (torch + transformers only).

No import of lpc here: peers.py runs in its own venv (.venv-peers) and must not see lpc, and the
bench talks to lpc only through its command line.

- Model: SmolLM2-135M-Instruct as a bf16 Hugging Face directory, found (or fetched) by
  ../shared/assets/smollm2/get.sh, which respects LPC_MODELS.
- Calibration: calib_tail.txt, the whole text tokenized once with the tokenizer's default special
  tokens (none for SmolLM2), cut into consecutive windows of 512 tokens, the first 128 kept. This is
  what `lpc calibrate --data FILE.txt` does (pipeline/io/data.py, calibration_batches).
- Perplexity and KL: eval_head.txt tokenized once without special tokens (for SmolLM2 the default
  adds none either: the same 32,838 ids), non-overlapping windows of 2048 tokens, the last partial
  window kept (17 windows, 32,821 predictions). Perplexity = exp(summed next-token loss /
  predictions); KL = mean over the same predicted positions of KL(original || compressed), fp32
  softmax, each window summed in fp64 over chunks of 256 positions, windows added with math.fsum in
  input order. Batches of 8 windows sorted longest first, each scored in sub-batches of at most
  LOGIT_BUDGET logits (one 2048-token window of SmolLM2's vocabulary), right-padded and masked only
  when lengths differ: the same arithmetic as `lpc eval --seq-len 2048 [--baseline MODEL]`
  (pipeline/evaluation/perplexity.py), with its bounded memory.
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LPC_ASSETS", REPO.parent / "shared" / "assets")).resolve()
CALIB = ASSETS / "data" / "wikitext2" / "calib_tail.txt"
EVAL = ASSETS / "data" / "wikitext2" / "eval_head.txt"
MC = ASSETS / "data" / "mc"
CALIB_SAMPLES = 128
CALIB_SEQ_LEN = 512
EVAL_SEQ_LEN = 2048
BATCH_SIZE = 8
TASKS = ["arc_easy_local", "arc_challenge_local", "piqa_local", "winogrande_local", "openbookqa_local"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Reference figures (../shared/assets/SOURCES.md): the bf16 original in fp32 compute.
REF_PPL_FP32 = 20.85
REF_PREDICTIONS = 32821
LOGIT_BUDGET = 1 << 27  # = lpc.pipeline.evaluation.perplexity.LOGIT_BUDGET (no lpc import here)
POSITION_CHUNK = 256


def model_dir() -> Path:
    """The SmolLM2 directory: get.sh prints it on its last line (and fetches it once if absent)."""
    get = ASSETS / "smollm2" / "get.sh"
    out = subprocess.run(["bash", str(get)], capture_output=True, text=True,
                         env={**os.environ, **OFFLINE_ENV}, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def peak_rss_mb_children() -> float:
    """Largest peak RSS (MB) among the waited-for children so far (ru_maxrss is a max, not a sum)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def calib_windows(tokenizer, path: Path = CALIB, samples: int = CALIB_SAMPLES,
                  seq_len: int = CALIB_SEQ_LEN) -> list[list[int]]:
    """The calibration windows, as `lpc calibrate --data FILE.txt --samples N --seq-len T` cuts them."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = list(tokenizer(text)["input_ids"])
    wins = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)][:samples]
    return [w for w in wins if len(w) >= 2]


def eval_windows(tokenizer, path: Path = EVAL, seq_len: int = EVAL_SEQ_LEN) -> list[list[int]]:
    """Non-overlapping windows of the eval text, tokenized without special tokens, last partial kept."""
    text = Path(path).read_text(encoding="utf-8")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    default = list(tokenizer(text)["input_ids"])
    if default != ids:  # lpc eval tokenizes with the default special tokens
        raise SystemExit(f"{path}: the tokenizer's default adds special tokens; lpc eval would differ")
    return [w for w in (ids[i:i + seq_len] for i in range(0, len(ids), seq_len)) if len(w) >= 2]


def _batches(seqs: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _sub_batches(lengths: list[int], vocab: int, budget: int | None = None) -> list[list[int]]:
    """Consecutive positions of `lengths` (longest first) with rows x longest x vocab <= budget (>= 1 row)."""
    budget = LOGIT_BUDGET if budget is None else budget
    groups: list[list[int]] = []
    for j in range(len(lengths)):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] * vocab <= budget:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups


def _row_kl(p, q) -> float:
    """Summed KL(softmax p || softmax q) over positions, fp32 log-softmax, fp64 sum, in position chunks."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, p.shape[0], POSITION_CHUNK):
        lp = torch.log_softmax(p[s:s + POSITION_CHUNK].float(), -1)
        lq = torch.log_softmax(q[s:s + POSITION_CHUNK].float(), -1)
        total += (lp.exp() * (lp - lq)).sum(dtype=torch.float64)
    return float(total)


def _logits(model, rows: list[list[int]]):
    import torch

    seqs = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)
    padded = bool((mask == 0).any())
    return model(input_ids=ids, attention_mask=mask if padded else None).logits


def score(model, seqs: list[list[int]], baseline=None, batch_size: int = BATCH_SIZE) -> dict:
    """Perplexity of `model` over `seqs` and, with `baseline`, mean KL(baseline || model) per prediction."""
    import torch
    import torch.nn.functional as F

    losses = [0.0] * len(seqs)
    kls = [0.0] * len(seqs)
    model.eval()
    if baseline is not None:
        baseline.eval()
    with torch.inference_mode():
        for batch in _batches(seqs, batch_size):
            for sub in _sub_batches([len(seqs[i]) for i in batch], model.config.vocab_size):
                sub = [batch[j] for j in sub]
                rows = [seqs[i] for i in sub]
                q = _logits(model, rows)
                p = _logits(baseline, rows) if baseline is not None else None
                for k, (i, row) in enumerate(zip(sub, rows)):
                    lq32 = q[k, :len(row) - 1].float()
                    target = torch.tensor(row[1:], dtype=torch.long)
                    losses[i] = float(F.cross_entropy(lq32, target, reduction="sum"))
                    if p is not None:
                        kls[i] = _row_kl(p[k, :len(row) - 1], q[k, :len(row) - 1])
                del q, p
    count = sum(len(s) - 1 for s in seqs)
    out = {"perplexity": math.exp(math.fsum(losses) / count), "predictions": count, "windows": len(seqs)}
    if baseline is not None:
        out["kl_to_original"] = math.fsum(kls) / count
    return out
