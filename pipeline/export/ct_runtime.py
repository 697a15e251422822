"""A compressed-tensors export loaded by transformers, made to run in the dtype it was loaded in.

transformers' compressed-tensors integration leaves mixed-precision and W4A4 exports compressed and lets
compressed-tensors decompress them on the first forward; compressed-tensors decompresses NVFP4 and MX
weights to bfloat16 whatever the model's dtype, so a model loaded with `dtype=torch.float32` fails on
its first matmul (float input, bf16 weight). `settle(model)` decompresses at once and gives each
decompressed Linear weight the model's dtype: bf16 -> f32 is exact, so the float32 model computes with
exactly the weights the library decompressed (and keeps its quantized activations). `lpc.load` applies
it to every compressed-tensors export; after a plain `from_pretrained(export, dtype=torch.float32)`
call it yourself:

    from lpc.pipeline.export.ct_runtime import settle
    model = settle(AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32))

The FP8 KV cache (`kv_cache_scheme` with `<attn>.k_scale` / `v_scale`): compressed-tensors 0.20 finds the
attention modules to hook by a `past_key_values` argument, which transformers 5 renamed `cache`, so
from_pretrained loads the scales as unexpected keys and runs an unquantized cache. `settle(model, dir)`
attaches lpc's own FP8 KV quantization with exactly those scales (what vLLM runs), so `lpc.load` and
`lpc eval` of such an export measure the quantized cache.

Simulated FP4 activations (NVFP4 W4A4 exports) round every Linear input to E2M1 at each forward;
compressed-tensors' CPU fallback for that rounding is eight masked assignments, two thirds of a
W4A4 forward on CPU. `settle` registers, through compressed-tensors' own backend registry
(`ImplBackend`), a CPU rounding that gives the same values bit for bit with the same ties (lpc's
E2M1 thresholds, compiled): a W4A4 export evaluates about 3x faster (`bench/ct_runtime.py`).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in: its input embedding's (never quantized)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and emb.weight.is_floating_point():
        return emb.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def settle(model: nn.Module, directory: str | Path | None = None) -> nn.Module:
    """Decompress a compressed-tensors model now (if its first forward would), cast each Linear's
    decompressed weight to the model's dtype, and attach the export's FP8 KV cache scales (read from
    `directory`, default the model's own); a model with nothing to settle is returned unchanged."""
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    from lpc.pipeline.export.ct_experts import reload_experts  # transformers' expert path drops NVFP4 global scales
    reload_experts(model, Path(directory or getattr(getattr(model, "config", None), "_name_or_path", "") or "."))
    if compressor is None:  # not a compressed-tensors model: nothing of it is touched
        return model
    register_fast_fp4_cast()
    if hasattr(model, "ct_decompress_hook"):
        compressor.decompress_model(model)
    dtype = model_float_dtype(model)
    cast = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and hasattr(module, "quantization_scheme") and isinstance(w, torch.Tensor)
                and w.is_floating_point() and w.dtype != dtype):
            module.weight.data = w.data.to(dtype)
            cast.append(name)
    if cast:
        log.info("compressed-tensors model: %d decompressed weight(s) given the model's dtype %s", len(cast), dtype)
    directory = Path(directory or getattr(model.config, "_name_or_path", "") or ".")
    if _kv_scheme(directory) is not None and not any(hasattr(m, "kv_cache") for m in model.modules()):
        attach_ct_kv(model, directory)
    return model


def _kv_scheme(directory: Path) -> dict | None:
    config = directory / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("kv_cache_scheme") if qc.get("quant_method") == "compressed-tensors" else None


def amax_for_scale(s: torch.Tensor) -> torch.Tensor:
    """The f32 amax whose FP8 scale amax/448 is exactly s (s*448 rounded, nudged one ulp where needed)."""
    a = (s.float() * 448.0).reshape(())
    for _ in range(4):
        got = a / 448.0
        if torch.equal(got, s.float().reshape(())):
            break
        a = torch.nextafter(a, torch.tensor(float("inf")) if got < s.float().reshape(()) else torch.tensor(0.0))
    return a


def attach_ct_kv(model: nn.Module, directory: Path) -> None:
    """lpc's FP8 E4M3 KV quantization with the export's per-layer k_scale / v_scale (per tensor, static)."""
    from safetensors import safe_open

    from lpc.pipeline.errors import ArtifactError
    from lpc.pipeline.kvcache import KVSpec, attach_kv_quantization

    specs = []
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for i in range(model.config.num_hidden_layers):
            pair = []
            for part in ("k", "v"):
                # <layers>.<i>.<attention module>.k_scale: self_attn, or GPT-NeoX's attention, GPT-2's attn
                key = next((k for k in keys if re.search(rf"\.{i}\.[^.]+\.{part}_scale$", k)), None)
                if key is None:
                    raise ArtifactError(f"{directory}: kv_cache_scheme is set but layer {i} has no {part}_scale",
                                        "re-export the artifact with lpc export")
                pair.append(KVSpec("fp8_e4m3", {"granularity": "tensor"}, amax_for_scale(f.get_tensor(key))))
            specs.append((pair[0], pair[1]))
    attach_kv_quantization(model, specs)


def _fp4_cast(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `cast_to_fp4` (nearest E2M1 value, ties to even, NaN kept), in x's dtype."""
    from lpc.formats.kernels import e2m1_magnitude

    xf = x.float()
    return torch.where(torch.isnan(xf), xf, torch.copysign(e2m1_magnitude(xf.abs()), xf)).to(x.dtype)


def _fp4_cast_kernel(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (_fp4_cast(x),)


def fp4_cast_cpu(x: torch.Tensor) -> torch.Tensor:
    """`_fp4_cast` compiled by lpc's kernel runner (leading dimensions dynamic), eager where compiling
    is off or fails."""
    from lpc.formats import fast

    out = fast.run_compiled(_fp4_cast_kernel, x)
    return out[0] if out is not None else _fp4_cast(x)


_fp4_cast_state: dict[str, bool] = {}


def register_fast_fp4_cast() -> bool:
    """Give compressed-tensors' `cast_to_fp4` the CPU backend above (once); False if this
    compressed-tensors has no backend registry for it (then its own rounding runs)."""
    if _fp4_cast_state.get("registered"):
        return True
    try:
        from compressed_tensors.quantization.utils import fp4_utils  # noqa: F401  (defines the entrypoint)
        from compressed_tensors.utils.impl_backend import ImplBackend
    except ImportError:
        return False
    if "cast_to_fp4" not in getattr(ImplBackend, "_fn_registry", {}):
        return False
    ImplBackend.register("cast_to_fp4", req=lambda x, *a, **k: x.device.type == "cpu", priority=1)(fp4_cast_cpu)
    _fp4_cast_state["registered"] = True
    return True
