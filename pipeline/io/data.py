"""Calibration text: a .txt or .jsonl file, a saved `datasets` directory, a hub dataset id, or `self`.

Every source becomes a list of token-id tensors of shape (1, T), T <= seq_len.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.errors import InputError

log = logging.getLogger(__name__)
JSONL_HINT = 'each line must be a JSON object like {"text": "..."}'


def read_texts(spec: str | Path, limit: int | None = None) -> list[str]:
    """Texts of a .txt (one text), .jsonl (`text` field per line) or saved datasets directory."""
    p = Path(spec)
    if p.is_dir():
        return _dataset_texts(_load_from_disk(p), limit, str(p))
    if p.suffix == ".jsonl":
        return read_jsonl_texts(p, limit)
    if p.is_file():
        return [read_text_file(p)]
    if str(spec).count("/") == 1 and not p.suffix:
        return _dataset_texts(_load_hub(str(spec)), limit, str(spec))
    raise InputError(f"data {spec} does not exist",
                     "give a .txt or .jsonl file, a saved datasets directory, a hub dataset id, or 'self'")


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a file; a missing, empty, binary or non-UTF-8 file is an InputError."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"text file {p} does not exist or is not a file", "check the path")
    raw = p.read_bytes()
    try:
        # Universal newlines, as Path.read_text gives: "\r\n" and "\r" read as "\n".
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        raise InputError(f"{p} is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x})",
                         "give a text file (.txt, or .jsonl with a 'text' field), converted to UTF-8") from None
    if "\x00" in text:
        raise InputError(f"{p} holds NUL bytes: it looks like a binary file, not text",
                         "give a text file (.txt, or .jsonl with a 'text' field)")
    if not text.strip():
        raise InputError(f"{p} is empty", "give a file with text in it")
    return text


def read_jsonl_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The `text` field of every non-blank line of a .jsonl file (the first `limit` records).

    The one JSONL reader of lpc (calibration data and evaluation text); a bad line raises an
    InputError naming the file and the line number."""
    p = Path(path)
    lines = read_text_file(p).splitlines()
    texts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{p}, line {lineno}: not valid JSON ({err.msg})", JSONL_HINT) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise InputError(f'{p}, line {lineno}: no string field "text" (found {found})', JSONL_HINT)
        texts.append(rec["text"])
        if limit is not None and len(texts) >= limit:
            break
    return texts


def _load_from_disk(p: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(p))
    except Exception as err:
        raise InputError(f"{p} is not a saved datasets directory ({err})".splitlines()[0],
                         "save one with Dataset.save_to_disk, or give a .txt/.jsonl file") from None


def _load_hub(name: str):
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as err:
        raise InputError(f"cannot load dataset {name} from the hub: {str(err).splitlines()[0]}",
                         "this needs network access; offline, give a local .txt/.jsonl file or 'self'") from None


def _dataset_texts(ds: Any, limit: int | None, source: str) -> list[str]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):  # a saved dict of splits: take train, else the first
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if "text" not in ds.column_names:
        raise InputError(f"dataset {source} has no 'text' column (columns: {ds.column_names})",
                         "calibration needs a 'text' column")
    n = len(ds) if limit is None else min(limit, len(ds))
    return [t for t in ds.select(range(n))["text"] if isinstance(t, str) and t.strip()]


def calibration_batches(spec: str, tokenizer, samples: int, seq_len: int, model=None,
                        seed: int = 0) -> list[torch.Tensor]:
    """Token ids (1, T) for calibration.

    Files of many records (.jsonl, datasets) give one sequence per record, truncated to seq_len;
    a single text (.txt) is cut into consecutive windows of seq_len; `self` samples from the model.
    """
    if spec == "self":
        if model is None:
            raise InputError("--data self needs the model to sample from")
        return sample_from_model(model, tokenizer, samples, seq_len, seed)
    texts = read_texts(spec, limit=None if Path(spec).suffix == ".txt" else samples)
    if len(texts) == 1 and len(texts[0]) > 0 and not Path(spec).suffix == ".jsonl":
        ids = tokenizer(texts[0], return_tensors="pt").input_ids[0]
        out = [ids[i:i + seq_len].unsqueeze(0) for i in range(0, len(ids) - 1, seq_len)][:samples]
    else:
        out = [tokenizer(t, return_tensors="pt").input_ids[:, :seq_len] for t in texts[:samples]]
    out = [t for t in out if t.shape[1] >= 2]
    if not out:
        raise InputError(f"calibration data {spec} gives no sequence of 2 or more tokens", "give more text")
    tokens = sum(t.shape[1] for t in out)
    if len(out) < samples or tokens < seq_len:
        log.warning("calibration data %s gives %d sequence(s), %d tokens in all (asked for %d x %d tokens); "
                    "statistics from so little text are noisy", spec, len(out), tokens, samples, seq_len)
    return out


@torch.no_grad()
def sample_from_model(model, tokenizer, samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Calibration text the model writes itself: sampled at temperature 1 from BOS, seeded."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise InputError("--data self needs a tokenizer with a BOS or EOS token", "give a text file with --data")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for _ in range(samples):
        ids = torch.tensor([[bos]], device=device)
        step = model(ids, use_cache=True)
        for _ in range(seq_len - 1):
            probs = torch.softmax(step.logits[0, -1].float().cpu(), -1)
            nxt = torch.multinomial(probs, 1, generator=gen).to(device).view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            step = model(nxt, past_key_values=step.past_key_values, use_cache=True)
        out.append(ids.cpu())
    return out
