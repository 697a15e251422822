"""Encoder-only models (BERT-style): loaded with their own class, never a causal-LM head made up at random.

The class is the one whose tensors the checkpoint holds: BERT checkpoints saved for pre-training hold the
pooler and the next-sentence head next to the MLM head (`BertForPreTraining`), others only the MLM head
(`BertForMaskedLM`) or only the encoder (`BertModel`). Loading with a class whose tensors the checkpoint
lacks would initialise them at random; one that lacks tensors of the checkpoint would drop them from
every export. So the candidates are built on the meta device (no memory) and the first whose parameter
names equal the checkpoint's (tied copies aside) wins; else the one missing fewest, then dropping fewest.
The choice is written to `config.architectures`, so lpc's artifacts rebuild the same class.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open

log = logging.getLogger(__name__)

# Auto classes by the suffix of an architecture name, most complete first.
AUTO_BY_SUFFIX = (("ForPreTraining", "AutoModelForPreTraining"), ("ForMaskedLM", "AutoModelForMaskedLM"),
                  ("Model", "AutoModel"))


def auto_class(architecture: str | None):
    """The transformers auto class that builds `architecture` (AutoModel when unknown)."""
    import transformers

    for suffix, auto in AUTO_BY_SUFFIX:
        if architecture and architecture.endswith(suffix):
            return getattr(transformers, auto)
    return transformers.AutoModel


def checkpoint_keys(model_dir: Path) -> set[str] | None:
    """Tensor names of a local safetensors checkpoint (single file or sharded), None when unreadable."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as fh:
        return set(fh.keys())


def encoder_class(src: str, config: Any):
    """The auto class to load the encoder at `src` with (see the module docstring)."""
    from accelerate import init_empty_weights

    # an engine export (compressed-tensors...) names its tensors after its own layout: trust architectures
    quantized = getattr(config, "quantization_config", None) is not None
    keys = checkpoint_keys(Path(src)) if Path(src).is_dir() and not quantized else None
    archs = list(getattr(config, "architectures", None) or [])
    if keys is None:
        return auto_class(archs[0] if archs else None)
    import transformers

    ranked = []
    for order, (_, auto_name) in enumerate(AUTO_BY_SUFFIX):
        auto = getattr(transformers, auto_name)
        try:
            with init_empty_weights():
                model = auto.from_config(config)
        except ValueError:  # this model type has no such head
            continue
        names = _untied_names(model)
        missing, dropped = len(names - keys), len(keys - names)
        ranked.append((missing, dropped, order, auto))
    if not ranked:
        return auto_class(archs[0] if archs else None)
    missing, dropped, _, best = min(ranked, key=lambda r: r[:3])
    if missing or dropped:
        log.warning("no %s class matches the checkpoint's tensors exactly (%d missing, %d not used); loading "
                    "with %s", getattr(config, "model_type", "encoder"), missing, dropped, best.__name__)
    return best


def _untied_names(model: Any) -> set[str]:
    """State-dict names of `model` without tied copies: tensors shared with an earlier name, and the names
    the class declares tied (`_tied_weights_keys`; on the meta device the ties are not made yet)."""
    first = {n for n, _ in model.named_parameters()}
    copies = {n for n, _ in model.named_parameters(remove_duplicate=False)} - first
    declared = getattr(model, "_tied_weights_keys", None) or {}
    return set(model.state_dict()) - copies - set(declared if isinstance(declared, (dict, list, tuple, set)) else ())


def is_encoder(model: Any) -> bool:
    """True for a loaded encoder-only model (its config's model_type is an encoder's)."""
    from lpc.pipeline.io.families import model_kind

    return model_kind(getattr(model, "config", None) or {}) == "encoder"


def encoder_loss(model: Any, ids: Any) -> Any:
    """The objective calibration's Fisher differentiates for an encoder: the cross-entropy of its
    masked-LM head over the sequence's own tokens (ids (1, T) -> scalar). Unmasked: calibration has the
    token ids but no mask token, and the head's prediction of each visible token is what its weights
    serve at every position. An encoder without an MLM head has no loss to differentiate: refused."""
    import torch.nn.functional as F

    from lpc.pipeline.errors import InputError

    out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = getattr(out, "prediction_logits", None)
    if logits is None:
        raise InputError(f"{type(model).__name__} has no masked-LM head, so Fisher statistics have no loss to "
                         "differentiate", "calibrate without Fisher (a recipe without calibrate.fisher), or give "
                         "the checkpoint with its MLM head")
    return F.cross_entropy(logits[0].float(), ids[0])
