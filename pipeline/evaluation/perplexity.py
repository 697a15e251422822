"""Perplexity and KL to a baseline of a loaded (model, tokenizer) over a text file, as `lpc eval` runs them.

The other parts of evaluation: `tasks.py` (lm-evaluation-harness tasks), `compare.py` (deltas,
recovery, the CI gate).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.io.data import read_jsonl_texts, read_text_file
from lpc.pipeline.modes import eval_mode
from lpc.pipeline.progress import Progress, track

log = logging.getLogger(__name__)

# The most logits (batch x positions x vocab elements) computed at once: 2**27 is 0.5 GB in fp32,
# about one 2048-token window of a 49k vocabulary. A batch holding more is scored in sub-batches.
LOGIT_BUDGET = 1 << 27
# Positions whose fp32 log-softmax copies exist at once when a row's KL is summed.
POSITION_CHUNK = 256


def perplexity(model: torch.nn.Module, tokenizer: Any, path: str | Path, seq_len: int = 256,
               progress: Progress | None = None, batch_size: int = 8,
               max_tokens: int | None = None, logit_budget: int | None = None) -> dict:
    """Perplexity of `model` (on `model.device`) over the text in `path`.

    Protocol. `.jsonl` (an object with a string `text` per line): each record's text tokenized on
    its own with the tokenizer's default special tokens (BOS for Llama), truncated to `seq_len`.
    Any other file: the whole text tokenized once, cut into non-overlapping windows of `seq_len`
    tokens, the last partial window kept if it has >= 2 tokens. `max_tokens` keeps only the first
    tokens of that stream (for jsonl, the truncated records laid end to end). A sequence of n
    tokens gives n-1 predictions; perplexity = exp(summed loss / predictions). Batches of
    `batch_size` (sorted by length, right-padded, masked) give the one-at-a-time result up to
    float rounding; a batch's logits are computed in sub-batches of at most `logit_budget`
    elements (default LOGIT_BUDGET), so memory does not grow with `batch_size`.

    Returns {"perplexity": float, "tokens": int (predictions), "sequences": int,
    "nll": float (mean loss, nats), "protocol": str}.
    """
    path = Path(path)
    check_int("seq_len", seq_len, 2, "use a window of at least 2 tokens, e.g. 256")
    check_int("batch_size", batch_size, 1, "use 1 or more")
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 2, "use at least 2 tokens, or None for all")
    seqs, how = _sequences(tokenizer, path, seq_len, max_tokens)
    total, count = _score(model, seqs, batch_size, progress, logit_budget)
    return {"perplexity": math.exp(total / count), "tokens": count, "sequences": len(seqs),
            "nll": total / count,
            "protocol": f"{path.name}: {how}; exp(token-weighted mean next-token loss)"}


def token_windows(tokenizer: Any, path: str | Path, seq_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """The token sequences the perplexity protocol scores for `path` (what `perplexity` evaluates)."""
    return _sequences(tokenizer, Path(path), seq_len, max_tokens)[0]


def _sequences(tokenizer: Any, path: Path, seq_len: int, max_tokens: int | None) -> tuple[list[list[int]], str]:
    """The token sequences of the perplexity protocol and its description."""
    if path.suffix == ".jsonl":
        ids = tokenizer(read_jsonl_texts(path), verbose=False)["input_ids"]
        seqs = [list(x[:seq_len]) for x in ids]
        how = f"each record tokenized on its own, truncated to {seq_len} tokens"
    else:
        stream = list(tokenizer(read_text_file(path), verbose=False)["input_ids"])
        seqs = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        how = f"whole text tokenized once, non-overlapping windows of {seq_len} tokens"
    seqs = [s for s in _cap_tokens(seqs, max_tokens) if len(s) >= 2]
    if not seqs:
        raise InputError(f"{path} yields no sequence of 2 or more tokens", "give it more text")
    cap = f", first {max_tokens} tokens" if max_tokens is not None else ""
    return seqs, how + cap


def kl_divergence(model: torch.nn.Module, baseline: torch.nn.Module, tokenizer: Any, path: str | Path,
                  seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
                  progress: Progress | None = None, logit_budget: int | None = None) -> dict:
    """Mean KL(baseline || model) of the next-token distributions over the perplexity protocol's
    predicted positions of `path` (nats per token, fp32 softmax, summed in fp64).

    Unlike perplexity it does not depend on how well either model fits the text: 0 means the
    compressed model predicts exactly like the baseline. Both models must share the tokenizer and
    vocabulary. Memory: the logits of a batch are computed in sub-batches of at most
    `logit_budget` elements (default LOGIT_BUDGET; at least one row), so the peak does not grow with
    `batch_size`; the result is the whole batch's up to float rounding.
    Returns {"kl": float, "tokens": int, "protocol": str}.
    """
    path = Path(path)
    check_int("seq_len", seq_len, 2, "use a window of at least 2 tokens, e.g. 256")
    check_int("batch_size", batch_size, 1, "use 1 or more")
    seqs, how = _sequences(tokenizer, path, seq_len, max_tokens)
    batches = _length_batches(seqs, batch_size)
    parts = [0.0] * len(seqs)
    vocab = _vocab_size(model)
    with eval_mode(model), eval_mode(baseline), torch.inference_mode():
        for batch in track(batches, "kl", progress):
            # Streamed: the logits of both models exist for one sub-batch at a time (logit_budget),
            # and the fp32 log-softmax copies for POSITION_CHUNK positions at a time.
            for sub in _sub_batches([len(seqs[i]) for i in batch], vocab, logit_budget):
                rows = [seqs[batch[j]] for j in sub]
                q = _batch_logits(model, rows)
                p = _batch_logits(baseline, rows)
                if p.shape[-1] != q.shape[-1]:
                    raise InputError(f"the baseline has {p.shape[-1]} output classes, the model {q.shape[-1]}",
                                     "compare models that share the tokenizer and vocabulary")
                for k, (j, row) in enumerate(zip(sub, rows)):
                    parts[batch[j]] = _row_kl(p[k, : len(row) - 1], q[k, : len(row) - 1])
                del q, p
    count = sum(len(s) - 1 for s in seqs)
    return {"kl": math.fsum(parts) / count, "tokens": count,
            "protocol": f"{path.name}: {how}; mean KL(baseline || model) per predicted token"}


def _batch_logits(model: torch.nn.Module, rows: list[list[int]], device: Any = None) -> torch.Tensor:
    """Logits (batch, longest, vocab) of right-padded rows; no mask when nothing is padded (the
    plain causal path, as when scoring one at a time)."""
    device = device or getattr(model, "device", None) or next(model.parameters()).device
    seqs = [torch.tensor(row, dtype=torch.long) for row in rows]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (batch, longest) int64
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in seqs], batch_first=True)
    padded = bool((mask == 0).any())
    return model(input_ids=ids.to(device), attention_mask=mask.to(device) if padded else None).logits


def _vocab_size(model: torch.nn.Module) -> int:
    """The model's output classes (config.vocab_size, else the output embedding's rows; 1 if unknown)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(head.weight.shape[0]) if head is not None and hasattr(head, "weight") else 1
    return max(1, vocab)


def _sub_batches(lengths: list[int], vocab: int, budget: int | None) -> list[list[int]]:
    """Consecutive positions of `lengths` (sorted longest first) grouped so that rows x longest x vocab
    stays within `budget` elements (default LOGIT_BUDGET); a row over it alone is a group of one."""
    budget = LOGIT_BUDGET if budget is None else budget
    groups: list[list[int]] = []
    for j, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] * vocab <= budget:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups


def _row_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Summed KL(softmax p || softmax q) over the rows of logits p, q (positions, vocab): fp32
    log-softmax, fp64 sum, POSITION_CHUNK positions at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, p.shape[0], POSITION_CHUNK):
        lp = torch.log_softmax(p[s : s + POSITION_CHUNK].float(), -1)
        lq = torch.log_softmax(q[s : s + POSITION_CHUNK].to(lp.device).float(), -1)
        total += (lp.exp() * (lp - lq)).sum(dtype=torch.float64).cpu()
    return float(total)


def check_int(name: str, value: Any, least: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}", fix)


def _cap_tokens(seqs: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The sequences cut so that their lengths add up to at most `max_tokens`."""
    if max_tokens is None:
        return seqs
    out, left = [], max_tokens
    for seq in seqs:
        if left <= 0:
            break
        out.append(seq[:left])
        left -= len(out[-1])
    return out


def _score(model: torch.nn.Module, seqs: list[list[int]], batch_size: int,
           progress: Progress | None, logit_budget: int | None = None) -> tuple[float, int]:
    """(summed next-token loss in nats, as fp64; number of predictions) over `seqs`."""
    batches = _length_batches(seqs, batch_size)
    device = getattr(model, "device", None) or next(model.parameters()).device
    losses = [0.0] * len(seqs)
    with eval_mode(model), torch.inference_mode():
        for batch in track(batches, "perplexity", progress):
            for sub in _sub_batches([len(seqs[i]) for i in batch], _vocab_size(model), logit_budget):
                rows = [seqs[batch[j]] for j in sub]
                for j, loss in zip(sub, _batch_losses(model, rows, device)):
                    losses[batch[j]] = loss
    # Summed in input order so that the total does not depend on the batching.
    return math.fsum(losses), sum(len(s) - 1 for s in seqs)


def _length_batches(seqs: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `seqs` in batches, longest first, so a batch holds similar lengths (little padding)."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _batch_losses(model: torch.nn.Module, rows: list[list[int]], device: torch.device) -> list[float]:
    """Summed next-token loss of each row; rows are right-padded and masked when lengths differ."""
    logits_all = _batch_logits(model, rows, device)
    losses = []
    for k, row in enumerate(rows):
        # One row at a time in fp32 bounds the temporary to (len, vocab).
        logits = logits_all[k, : len(row) - 1].float()
        target = torch.tensor(row[1:], dtype=torch.long, device=logits.device)
        losses.append(float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")))
    return losses
