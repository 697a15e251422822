"""`lpc compensate`: low-rank paths that give back what quantization took (EoRA, SVD, ESPACE).

For every quantized Linear `<m>` of a quantize artifact, with W from the original model and
C = X^T X / n from calibration:

    dW = W - dequant(W_q)                  fp32
    mode residual:  y = W_q x + B (A x)    B (out, r), A (r, in) by eora / svd / espace (B = dW P, A = P^T)
    mode compress:  y = (W P)(P^T x)       espace only; W P quantized in the recipe's weight format

What comp/ holds (an lpc model directory, see `lpc_model`):
- residual: the packed weight fields of quant/ unchanged, plus the factors: `<m>.lora_A` (r, in) and
  `<m>.lora_B` (out, r) as bf16/fp32 tensors, or for fp8_e4m3/nvfp4 factors the packed fields
  `<m>.lora_A.qdata`, `<m>.lora_A.scale`, ... of that format.
- compress: the layer's packed weight is dropped (it leaves quantization_config.layers);
  `<m>.lora_B.<field>` holds W P packed in the weight format, `<m>.lora_A` holds P^T in
  factor_format. `load` gives such a Linear a zero weight plus its low-rank path: y = B (A x).
- config.json quantization_config.lowrank = {method, mode, factor_format, layers: {m: {method, mode,
  rank, factor_format[, factors: {lora_A: QTensor meta, lora_B: QTensor meta}]}}}; `factors` is there
  only for packed factors. A layer given rank 0 (by a budget) keeps its quantized weight alone.

Ranks: `rank` for every layer (capped at min(out, in)), or `budget_params` extra parameters spread
by `allocate_ranks` over each layer's output-error curve trace(E_r C E_r^T), r = 0..min(out, in).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from lpc.formats import QTensor, get_format
from lpc.pipeline.artifact import store as art
from lpc.pipeline.calibration.stored import STATS_FILE, read_stats
from lpc.pipeline.errors import ArtifactError, InputError
from lpc.pipeline.compensation.layer import choose_ranks, compensate_layer, low_rank_path
from lpc.pipeline.compensation.methods import LayerInputs
from lpc.pipeline.artifact.lpc_model import WEIGHTS, read_qconfig
from lpc.pipeline.export.stream import LayerMap
from lpc.pipeline.io.models import load_hf_model, model_files
from lpc.pipeline.progress import Progress, track
from lpc.pipeline.stages.base import StageResult, run_stage
from lpc.recipes.schema import CompensateConfig, Recipe

log = logging.getLogger(__name__)


def compensate(quant_dir: str | Path, calib_dir: str | Path, recipe: Recipe, out: str | Path,
               overwrite: bool = False, progress: Progress | None = None, device: str = "cpu") -> StageResult:
    """Add low-rank paths to a quantize artifact (see the module docstring); write comp/ at `out`.

    Inputs read: the quant artifact's files, calib/stats.safetensors and the original model's
    weight files (the quant manifest's config.model). Resumes, refuses and stages like every stage.
    """
    from lpc.pipeline.io.device import check_device

    device = check_device(device)
    cfg = _config_of(recipe)
    quant_dir, calib_dir, out = Path(quant_dir), Path(calib_dir), Path(out)
    qman = art.read_checked_manifest(quant_dir, "quantize")
    _check_calib(calib_dir)
    src = str(qman.get("config", {}).get("model") or "")
    if not src:
        raise ArtifactError(f"{quant_dir}/manifest.json does not name the original model (config.model)",
                            "re-run lpc quantize with this version of lpc")
    weights = recipe.quantize.weights.model_dump(mode="json") if cfg.mode == "compress" else None
    config = {"model": src, "compensate": cfg.model_dump(mode="json"), "weights": weights,
              "importance": recipe.quantize.importance}
    inputs = [quant_dir / n for n in sorted(qman["files"])] + [calib_dir / STATS_FILE] + model_files(src)

    def body(tmp: Path) -> dict[str, Any]:
        return _build(quant_dir, calib_dir, src, recipe, qman, tmp, progress, device)

    return run_stage("compensate", out, inputs, config, overwrite, body)


# ---------------------------------------------------------------- checks at the boundary

def _config_of(recipe: Recipe) -> CompensateConfig:
    cfg = recipe.compensate
    if cfg is None:
        raise InputError(f"recipe '{recipe.name}' has no compensate section",
                         "use --recipe nvfp4_eora, or add one with --set compensate.method=eora")
    return cfg


def _check_calib(calib_dir: Path) -> None:
    if not calib_dir.exists():
        raise InputError(f"calibration directory {calib_dir} does not exist",
                         "pass --calib with the output of lpc calibrate on the same model")
    art.read_manifest(calib_dir, "calibrate")
    if not (calib_dir / STATS_FILE).is_file():
        raise ArtifactError(f"{calib_dir} has no {STATS_FILE}", "re-run lpc calibrate")


def _check_stats(names: list[str], stats: dict[str, dict[str, torch.Tensor]], cfg: CompensateConfig,
                 calib_dir: Path) -> None:
    for name in names:
        if "act_cov" not in stats.get(name, {}):
            raise InputError(f"calibration {calib_dir} has no act_cov for layer {name}",
                             "calibrate the same model with the same targets (lpc calibrate MODEL --data ...)")
        need = "act_fisher" if cfg.mode == "compress" else "weight_fisher"
        if cfg.method == "espace" and cfg.espace_stat == "grad" and need not in stats[name]:
            raise InputError(f"compensate.espace_stat=grad needs {need}, and calibration {calib_dir} "
                             f"has none for layer {name}", "recalibrate with --fisher (calibrate.fisher=true)")


# ---------------------------------------------------------------- the stage body

def _build(quant_dir: Path, calib_dir: Path, src: str, recipe: Recipe, qman: dict[str, Any], tmp: Path,
           progress: Progress | None, device: str) -> dict[str, Any]:
    cfg = recipe.compensate
    qconfig = read_qconfig(quant_dir)
    if qconfig is None:
        raise ArtifactError(f"{quant_dir}/config.json has no lpc quantization_config", "re-run lpc quantize")
    qtensors = LayerMap(quant_dir, qconfig)  # one quantized layer read at a time
    stats = read_stats(calib_dir)
    names = sorted(qtensors)
    _check_stats(names, stats, cfg, calib_dir)
    fetch = _layer_reader(src, qtensors, stats, device, set(qconfig.get("transposed") or ()))
    ranks = choose_ranks(cfg, names, qtensors, lambda n: low_rank_path(cfg, fetch(n)), progress)
    from lpc.pipeline.artifact.shards import ModelTensors, ShardWriter

    writer = ShardWriter(tmp, None)  # each layer's factors spill as they are made; the rest is copied at close
    dropped: set[str] = set()
    lowrank, records, info = {}, {}, {}
    for name in track(names, "compensate", progress):
        x, q = fetch(name), qtensors[name]
        stored, rec = compensate_layer(cfg, recipe, name, x, ranks[name], q)
        records[name] = {**qman.get("layers", {}).get(name, {}), **rec}
        info[name] = (q.storage_bits(), q.numel, tuple(q.shape))
        if stored is not None:
            new: dict[str, torch.Tensor] = {}
            lowrank[name] = _add_factors(new, name, stored, cfg, q, dropped)
            writer.add(new)
    entries = ModelTensors(quant_dir).entries()  # model.safetensors or HF shards
    writer.add_entries({k: e for k, e in entries.items() if k not in dropped})
    _write_comp(quant_dir, qman, qconfig, writer, lowrank, cfg, tmp)
    summary = _summary(cfg, qman, records, info)
    return {"recipe": recipe.model_dump(mode="json"), "layers": records, "summary": summary,
            "bits_per_weight": summary["bits_per_weight"]}


def _layer_reader(src: str, qtensors: dict[str, QTensor], stats: dict, device: str,
                  transposed: set[str]) -> Callable[[str], LayerInputs]:
    """name -> LayerInputs, reading the original weight one layer at a time; `transposed`: the layers whose
    checkpoint weight is (in, out) (GPT-2 style Conv1D), turned to (out, in)."""
    original = _original_weights(src)

    def fetch(name: str) -> LayerInputs:
        q = qtensors[name]
        W = original(name)
        if name in transposed:
            W = W.T
        if tuple(W.shape) != tuple(q.shape):
            raise ArtifactError(f"layer {name}: the original weight is {tuple(W.shape)} but the quantized one "
                                f"is {tuple(q.shape)}", "the quant artifact was made from another model")
        return LayerInputs(W.to(device), get_format(q.format).dequantize(q).to(device),
                           stats[name]["act_cov"].float().to(device), **_fisher_inputs(stats[name], device))

    return fetch


def _fisher_inputs(stat: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """g_in = act_fisher (in,); g_out (out,) = sum_i weight_fisher[o, i], which is E[(dL/dy_o)^2] up to
    one constant factor: with gradients and inputs independent, weight_fisher[o, i] ~ E[g_o^2] C_ii."""
    out = {}
    if "act_fisher" in stat:
        out["g_in"] = stat["act_fisher"].float().to(device)
    if "weight_fisher" in stat:
        out["g_out"] = stat["weight_fisher"].double().sum(1).to(device)
    return out


def _original_weights(src: str) -> Callable[[str], torch.Tensor]:
    """`<m>.weight` of the original model as fp32 (out, in): safetensors mmap, else a full load."""
    index = {}
    for f in model_files(src):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                index.update(dict.fromkeys(fh.keys(), f))
    loaded: dict[str, Any] = {}

    def read(name: str) -> torch.Tensor:
        key = f"{name}.weight"
        if key in index:
            with safe_open(str(index[key]), framework="pt") as fh:
                return fh.get_tensor(key).float()
        if "model" not in loaded:  # .bin checkpoints or a hub id: no per-tensor access
            loaded["model"] = load_hf_model(src)
        return loaded["model"].get_submodule(name).weight.detach().float()

    return read


# ---------------------------------------------------------------- writing comp/

def _add_factors(tensors: dict[str, torch.Tensor], name: str, stored: dict[str, Any], cfg: CompensateConfig,
                 q: QTensor, dropped: set[str]) -> dict[str, Any]:
    """Put one layer's factors into `tensors` (and the artifact tensors they replace into `dropped`);
    return its qconfig.lowrank entry."""
    entry: dict[str, Any] = {"method": cfg.method, "mode": cfg.mode, "rank": int(stored["A"].shape[0]),
                             "factor_format": cfg.factor_format}
    metas = {}
    for part, val in sorted(stored["packed"].items()):
        if isinstance(val, QTensor):
            metas[part] = val.meta()
            tensors.update({f"{name}.{part}.{k}": t for k, t in get_format(val.format).pack(val).items()})
        else:
            tensors[f"{name}.{part}"] = val
    if metas:
        entry["factors"] = metas
    if cfg.mode == "compress":
        dropped.update(f"{name}.{field}" for field in q.data)  # the quantized W is replaced by the factored layer
    return entry


def _write_comp(quant_dir: Path, qman: dict[str, Any], qconfig: dict[str, Any], writer: Any,
                lowrank: dict[str, dict[str, Any]], cfg: CompensateConfig, tmp: Path) -> None:
    qconfig = dict(qconfig)
    qconfig["layers"] = {n: m for n, m in qconfig["layers"].items()
                         if lowrank.get(n, {}).get("mode") != "compress"}
    qconfig["lowrank"] = {"method": cfg.method, "mode": cfg.mode, "factor_format": cfg.factor_format,
                          "layers": lowrank}
    config = json.loads((quant_dir / "config.json").read_text())
    config["quantization_config"] = qconfig
    art.write_json(tmp / "config.json", config)
    writer.close(metadata={"format": "pt"})
    from lpc.pipeline.artifact.shards import INDEX, model_tensor_files

    weights = {f.name for f in model_tensor_files(quant_dir).values()} | {INDEX}  # rewritten above
    for name in sorted(qman["files"]):
        if name not in ("config.json", WEIGHTS) and name not in weights:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes((quant_dir / name).read_bytes())


def _summary(cfg: CompensateConfig, qman: dict[str, Any], records: dict[str, dict[str, Any]],
             info: dict[str, tuple[int, int, tuple[int, ...]]]) -> dict[str, Any]:
    """Stage summary; bits_per_weight over all target weights, factors included. info: per layer
    (stored bits, elements, shape) of its quantized weight."""
    qsum = qman.get("summary", {})
    params = int(qsum.get("target_params") or sum(numel for _, numel, _ in info.values()))
    total = round(float(qman.get("bits_per_weight") or 0.0) * params)
    for name, rec in records.items():
        total += rec["factor_bits"] - (info[name][0] if rec["mode"] == "compress" else 0)
    n = max(len(records), 1)
    return {"method": cfg.method, "mode": cfg.mode, "factor_format": cfg.factor_format,
            "rank": None if cfg.budget_params else cfg.rank, "budget_params": cfg.budget_params,
            "factor_params": sum(r["rank"] * sum(info[k][2]) for k, r in records.items()),
            "layers": len(records), "quant_bits_per_weight": qman.get("bits_per_weight"),
            "bits_per_weight": total / max(params, 1),
            "rel_output_error_before": sum(r["rel_output_error_before"] for r in records.values()) / n,
            "rel_output_error": sum(r["rel_output_error"] for r in records.values()) / n}
