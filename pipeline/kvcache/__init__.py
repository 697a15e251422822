"""KV cache compression: calibrated K/V quantization simulated through a transformers Cache.

The recipe's `kv_cache` section names a format (any lpc format), its spec, where scales come from
(`scales: tensor | head | dynamic | token`), `sinks` (leading tokens kept at full precision), `headroom`,
`rotate`, KIVI grouping (`kivi: true`: keys per channel in groups of `group` tokens, values per token)
`smooth` (per-channel power-of-two factors folded into q/k and v/o weights, `smooth.py`) and
`scale_search` (each layer's static scale multiplier chosen on the calibration sample, `search.py`).
Calibration writes calib/kv_stats.safetensors (per layer, the absmax of keys after RoPE and of values
per KV head and per KV head and channel); quantize stores them in the artifact as `lpc.kv.<i>.k_amax` /
`v_amax` / `k_chan_amax` / `v_chan_amax` (of the smoothed model when smoothing, with the exponents as
`k_smooth_log2` / `v_smooth_log2`) with the section in quantization_config["kv_cache"]; load attaches
the quantized cache.

Cache policies (eviction and mixed precision under a byte budget, `policy.py` and one module per
policy: uniform, streaming, h2o, thinkv) are simulated by `lpc eval` through `decode.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.errors import ArtifactError, InputError, RecipeError
from lpc.pipeline.kvcache.cache import QuantizedKVCache, attach_kv_quantization
from lpc.pipeline.kvcache.calibrate import kv_statistics
from lpc.pipeline.kvcache.quantizer import KVSpec

KV_STATS_FILE = "kv_stats.safetensors"
KV_PREFIX = "lpc.kv."


def check_kv_model(src: str, recipe: Any) -> None:
    """A kv_cache section on a model that keeps no KV cache (an encoder) is refused before any work."""
    from lpc.pipeline.evaluation.fidelity import is_encoder_dir

    if recipe is not None and recipe.kv_cache is not None and is_encoder_dir(src):
        raise RecipeError(f"{src} is an encoder: it keeps no KV cache for the recipe's kv_cache section to quantize",
                          "drop the kv_cache section (or use the same recipe without kv_, e.g. nvfp4 or fp8)")


def kv_stat_tensors(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{layer: {k_amax, v_amax}} -> flat tensors `<layer>.k_amax` for safetensors."""
    return {f"{i}.{key}": t.float().contiguous() for i, s in sorted(stats.items()) for key, t in s.items()}


def read_kv_stats(calib_dir: str | Path) -> dict[str, torch.Tensor]:
    """calib/kv_stats.safetensors as artifact tensors `lpc.kv.<layer>.k_amax` / `v_amax`."""
    from lpc.pipeline.artifact.store import load_tensors

    path = Path(calib_dir) / KV_STATS_FILE
    if not path.is_file():
        raise InputError(f"calibration {calib_dir} has no K/V statistics ({KV_STATS_FILE})",
                         "calibrate with a recipe that has a kv_cache section (the same recipe as quantize)")
    return {KV_PREFIX + k: v for k, v in load_tensors(path).items()}


def kv_artifact(recipe: Any, calib: str | Path | None, model: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """(the artifact's `lpc.kv.*` tensors, weight transforms) for the recipe's kv_cache section.

    Without `smooth` the transforms are empty. With it they map parameter names of `model` (loaded or
    a meta skeleton) to the exact functions that fold the smoothing into its q/k (and v/o) weights, to
    apply before the weights are quantized; the K/V statistics are those of the smoothed model."""
    kv = recipe.kv_cache
    if kv is None:
        return {}, {}
    stats, transforms = read_kv_stats(calib), {}
    if kv.smooth:
        if recipe.compensate is not None:
            raise RecipeError("kv_cache.smooth changes the q/k/v/o weights, which compensate would read unsmoothed "
                              "from the original model", "drop kv_cache.smooth or the compensate section")
        from lpc.pipeline.kvcache.smooth import smoothed_stats, smoothing_plan, weight_transforms

        plan = smoothing_plan(stats, model.config, kv.smooth_alpha, kv.smooth_values)
        stats, transforms = smoothed_stats(stats, plan), weight_transforms(model, plan)
    if kv.scale_search:
        from lpc.pipeline.kvcache.search import search_scales

        stats = search_scales(stats, kv.model_dump(mode="json"))
    return {k: v for k, v in stats.items() if not k.endswith("_sample")}, transforms


def kv_specs(config: dict[str, Any], tensors: dict[str, torch.Tensor], n_layers: int
             ) -> list[tuple[KVSpec | None, KVSpec | None]]:
    """quantization_config["kv_cache"] and the artifact's `lpc.kv.*` tensors -> (keys, values) per layer."""
    specs = []
    for i in range(n_layers):
        pair = []
        for part in ("k", "v"):
            amax = None
            if config.get("scales", "tensor") not in ("dynamic", "token"):
                key = f"{KV_PREFIX}{i}.{part}_amax"
                if key not in tensors:
                    raise ArtifactError(f"the artifact's KV cache section has no {key}",
                                        "re-run quantize with a calibration made with the kv_cache recipe")
                amax = tensors[key].float() * float(config.get("headroom") or 1.0)
                amax = amax.amax() if config.get("scales", "tensor") == "tensor" else amax
            pair.append(KVSpec(config["format"], dict(config.get("spec", {})), amax,
                               per_channel=part == "k" and bool(config.get("kivi")), group=int(config.get("group", 32)),
                               per_token=config.get("scales") == "token", sinks=int(config.get("sinks", 0)),
                               rotate=bool(config.get("rotate"))))
        specs.append((pair[0], pair[1]))
    return specs


__all__ = ["KVSpec", "KV_PREFIX", "KV_STATS_FILE", "QuantizedKVCache", "attach_kv_quantization", "kv_artifact", "kv_specs",
           "kv_stat_tensors", "kv_statistics", "read_kv_stats"]
