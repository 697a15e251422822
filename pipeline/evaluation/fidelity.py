"""Fidelity of an encoder (BERT-style), which has no next-token perplexity: the cosine between the
mean-pooled last hidden states of the compressed model and of the original, on the same text.

Each text file is cut into non-overlapping windows of `seq_len` tokens (as perplexity cuts it); the
figure per file is the mean over windows of cos(mean_t h_t, mean_t h'_t), h the last hidden state. It is
1.0 for an unchanged model and serves as the encoder's recovery (the `--fail-under-recovery` gate).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.errors import InputError
from lpc.pipeline.io.families import model_kind


def is_encoder_dir(path: str | Path) -> bool:
    """True when the model directory `path` holds an encoder-only model (config.json's model_type)."""
    cfg = Path(path) / "config.json"
    try:
        config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None
    except (ValueError, UnicodeDecodeError):  # a broken config.json is reported where the model is loaded
        return False
    return isinstance(config, dict) and model_kind(config) == "encoder"


def pooled(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, T) -> the mean over tokens of the last hidden state, (H,) float32."""
    with torch.no_grad():
        out = model(input_ids=ids.to(next(model.parameters()).device), output_hidden_states=True)
    return out.hidden_states[-1][0].float().mean(0).cpu()


def windows(tokenizer: Any, path: str | Path, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping (1, seq_len) windows of the file's tokens (a shorter last one kept if >= 2 tokens)."""
    from lpc.pipeline.io.data import read_texts

    ids = tokenizer("\n\n".join(read_texts(str(path))), return_tensors="pt").input_ids[0]
    out = [ids[i: i + seq_len].unsqueeze(0) for i in range(0, ids.numel(), seq_len)]
    return [w for w in out if w.shape[1] >= 2]


def fidelity(model: torch.nn.Module, baseline: torch.nn.Module, tokenizer: Any, path: str | Path,
             seq_len: int = 256) -> dict[str, Any]:
    """{"fidelity": mean cosine, "windows": n, "min": lowest cosine} of `model` against `baseline` on `path`."""
    cos = [torch.nn.functional.cosine_similarity(pooled(model, w), pooled(baseline, w), dim=0).item()
           for w in windows(tokenizer, path, seq_len)]
    if not cos:
        raise InputError(f"{path} holds fewer than 2 tokens", "give a text file to measure fidelity on")
    return {"fidelity": sum(cos) / len(cos), "windows": len(cos), "min": min(cos)}


def encoder_report(path: str | Path, baseline: str | Path | None, fail_under_recovery: float | None = None,
                   ppl: list[str] | None = None, seq_len: int = 256, device: str = "cpu",
                   tasks: list[str] | None = None, **_: Any) -> dict[str, Any]:
    """`lpc eval` of an encoder: fidelity per text file against `baseline` (required), recovery = their
    mean; raises GateFailed under `fail_under_recovery`. Task benchmarks (causal LM scoring) do not apply."""
    from lpc.pipeline.artifact.load import load
    from lpc.pipeline.evaluation.compare import gate_report

    if tasks:
        raise InputError(f"{path} is an encoder: lm-eval tasks score a causal LM's next-token likelihoods",
                         "drop --tasks; give --baseline MODEL and --ppl FILE to measure the encoder's fidelity")
    if baseline is None or not ppl:
        raise InputError(f"{path} is an encoder: it has no perplexity, lpc measures its fidelity to the original",
                         "give --baseline MODEL (the original) and --ppl FILE (text to compare on)")
    t0 = time.perf_counter()
    model, tok = load(path, device=device)
    base, _ = load(baseline, device=device)
    details = {str(f): fidelity(model, base, tok, f, seq_len) for f in ppl}
    scores = {f: d["fidelity"] for f, d in details.items()}
    out = {"model": str(path), "perplexity": {}, "tasks": {}, "fidelity": scores, "details": details,
           "baseline": {"model": str(baseline), "perplexity": {}, "tasks": {}},
           "recovery": sum(scores.values()) / len(scores), "seconds": round(time.perf_counter() - t0, 3)}
    gate_report(out, fail_under_recovery)
    return out
