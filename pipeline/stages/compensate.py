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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from lpc.formats import QTensor, get_format
from lpc.pipeline.artifact import store as art
from lpc.pipeline.calibration.stats import STATS_FILE, read_stats
from lpc.pipeline.errors import ArtifactError, InputError
from lpc.pipeline.compensation.espace import espace_compress, espace_projection, espace_residual
from lpc.pipeline.compensation.lowrank import (
    LowRankDecomposition, allocate_ranks, eora_decompose, output_error, quantize_factors, svd_decompose,
)
from lpc.pipeline.artifact.lpc_model import WEIGHTS, read_qconfig, read_qtensors
from lpc.pipeline.io.models import load_hf_model, model_files
from lpc.pipeline.progress import Progress, track
from lpc.pipeline.stages.core import StageResult, _run
from lpc.recipes.schema import CompensateConfig, Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInputs:
    """One layer's inputs, fp32 on the compute device: W and W_q (out, in), C (in, in), and with Fisher
    calibration g_in (in,) = E[(dL/dx)^2] (act_fisher), g_out (out,) ~ E[(dL/dy)^2] (see `_fisher_inputs`)."""

    W: torch.Tensor
    Wq: torch.Tensor
    C: torch.Tensor
    g_in: torch.Tensor | None = None
    g_out: torch.Tensor | None = None


@dataclass(frozen=True)
class LowRankPath:
    """What one layer's method offers: the output error left at ranks 0..cap, and factors at any rank."""

    curve: Callable[[int], list[float]]
    factors: Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def compensate(quant_dir: str | Path, calib_dir: str | Path, recipe: Recipe, out: str | Path,
               overwrite: bool = False, progress: Progress | None = None, device: str = "cpu") -> StageResult:
    """Add low-rank paths to a quantize artifact (see the module docstring); write comp/ at `out`.

    Inputs read: the quant artifact's files, calib/stats.safetensors and the original model's
    weight files (the quant manifest's config.model). Resumes, refuses and stages like every stage.
    """
    cfg = _config_of(recipe)
    quant_dir, calib_dir, out = Path(quant_dir), Path(calib_dir), Path(out)
    qman = _read_quant(quant_dir)
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

    return _run("compensate", out, inputs, config, overwrite, body)


# ---------------------------------------------------------------- checks at the boundary

def _config_of(recipe: Recipe) -> CompensateConfig:
    cfg = recipe.compensate
    if cfg is None:
        raise InputError(f"recipe '{recipe.name}' has no compensate section",
                         "use --recipe nvfp4_eora, or add one with --set compensate.method=eora")
    if cfg.mode == "compress" and cfg.method != "espace":
        raise InputError(f"compensate.mode=compress needs method espace, got method {cfg.method}",
                         "use --set compensate.method=espace, or --set compensate.mode=residual")
    return cfg


def _read_quant(quant_dir: Path) -> dict[str, Any]:
    manifest = art.read_manifest(quant_dir, "quantize")
    problems = art.verify_files(quant_dir, manifest)
    if problems:
        raise ArtifactError(f"{quant_dir}: {problems[0]}", "the artifact was changed or damaged; re-run lpc quantize")
    return manifest


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
    qtensors, _ = read_qtensors(quant_dir, qconfig)
    stats = read_stats(calib_dir)
    names = sorted(qtensors)
    _check_stats(names, stats, cfg, calib_dir)
    fetch = _layer_reader(src, qtensors, stats, device)
    ranks = _choose_ranks(cfg, names, qtensors, lambda n: _path(cfg, fetch(n)), progress)
    tensors = art.load_tensors(quant_dir / WEIGHTS)
    lowrank, records = {}, {}
    for name in track(names, "compensate", progress):
        x = fetch(name)
        stored, rec = _compensate_layer(cfg, recipe, name, x, ranks[name], qtensors[name])
        records[name] = {**qman.get("layers", {}).get(name, {}), **rec}
        if stored is not None:
            lowrank[name] = _add_factors(tensors, name, stored, cfg, qtensors[name])
    _write_comp(quant_dir, qman, qconfig, tensors, lowrank, cfg, tmp)
    summary = _summary(cfg, qman, records, qtensors)
    return {"recipe": recipe.model_dump(mode="json"), "layers": records, "summary": summary,
            "bits_per_weight": summary["bits_per_weight"]}


def _layer_reader(src: str, qtensors: dict[str, QTensor], stats: dict, device: str) -> Callable[[str], LayerInputs]:
    """name -> LayerInputs, reading the original weight one layer at a time."""
    original = _original_weights(src)

    def fetch(name: str) -> LayerInputs:
        q = qtensors[name]
        W = original(name)
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


# ---------------------------------------------------------------- per-layer numerics

def _path(cfg: CompensateConfig, x: LayerInputs) -> LowRankPath:
    """The method's decomposition of one layer (for compress mode: of W, else of dW)."""
    dW = x.W - x.Wq
    if cfg.method == "eora":
        dec = eora_decompose(dW, x.C)
        return LowRankPath(dec.residual_errors, dec.factors)
    if cfg.method == "svd":
        dec = svd_decompose(dW)
        return LowRankPath(lambda cap: _svd_curve(dec, x.C, cap), dec.factors)
    target = x.W if cfg.mode == "compress" else dW
    cap = min(x.W.shape)
    # The weight statistic models the output error of what is projected: dW for a residual path.
    P = espace_projection(cfg.espace_stat, cap, x.C, W=target, C_g=_gradient_stat(cfg, x, dW),
                          normalize_rows=cfg.normalize_rows)
    split = espace_compress if cfg.mode == "compress" else espace_residual
    return LowRankPath(lambda top: _projection_curve(target, P[:, :top], x.C),
                       lambda r: split(target, P[:, :r]))


def _gradient_stat(cfg: CompensateConfig, x: LayerInputs, dW: torch.Tensor) -> torch.Tensor | None:
    """C_G of ESPACE's gradient statistic, the autocorrelation of the loss gradient seen by P^T x.

    compress: the input x itself is projected, so C_G = diag(act_fisher) (in,).
    residual: what is left out is the output error dW Pi x, whose first-order loss change is
    g_y^T dW Pi x; so C_G = dW^T diag(g_out) dW (in, in), the output gradient pulled back through dW
    (act_fisher is the gradient pulled back through W, which says nothing about where dW errs)."""
    if cfg.espace_stat != "grad":
        return None
    if cfg.mode == "compress":
        return x.g_in
    d64 = dW.double()
    G = d64.T @ (x.g_out[:, None] * d64)
    return (G + G.T) / 2


def _svd_curve(dec: LowRankDecomposition, C: torch.Tensor, cap: int) -> list[float]:
    """Output error trace(E_r C E_r^T) of truncated SVD at ranks 0..cap.

    E_r = sum_{i >= r} s_i u_i v_i^T with orthonormal u_i, so the trace is sum_{i >= r} s_i^2 v_i^T C v_i."""
    Vh = dec.Vh
    energy = dec.s.square() * ((Vh @ C.to(Vh)) * Vh).sum(1)
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).cpu().tolist() + [0.0]
    return [tail[min(r, len(tail) - 1)] for r in range(cap + 1)]


def _projection_curve(T: torch.Tensor, P: torch.Tensor, C: torch.Tensor) -> list[float]:
    """Output error trace(T Pi_r C Pi_r T^T), Pi_r = I - P_r P_r^T, for r = 0..L with P (in, L).

    Expanded: tr(T C T^T) - 2 sum_{i<r} (P^T C K P)_ii + sum_{i,j<r} (P^T K P)_ij (P^T C P)_ij with
    K = T^T T, so every rank comes from prefix sums of one (L, L) matrix instead of L projections."""
    T64, P64, C64 = T.double(), P.double(), C.double()
    K = T64.T @ T64
    CP, KP = C64 @ P64, K @ P64
    total = float((K * C64).sum())
    cross = torch.cumsum((CP * KP).sum(0), 0)
    quad = torch.cumsum(torch.cumsum((P64.T @ KP) * (P64.T @ CP), 0), 1).diagonal()
    left = (total - 2 * cross + quad).clamp(min=0).cpu().tolist()
    return [total] + left


def _compensate_layer(cfg: CompensateConfig, recipe: Recipe, name: str, x: LayerInputs, rank: int,
                      q: QTensor) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Factors of one layer as stored, and its manifest record (rank, errors before/after, bits)."""
    dW = x.W - x.Wq
    ref = max(output_error(x.W, x.C), 1e-30)
    before = output_error(dW, x.C) / ref
    rec = {"method": cfg.method, "mode": cfg.mode, "rank": rank, "factor_format": cfg.factor_format,
           "rel_output_error_before": before, "rel_output_error": before, "factor_bits": 0,
           "bits_per_weight": q.bits_per_weight()}
    if rank == 0:
        rec.update(method="none", mode="none")
        return None, rec
    B, A = _path(cfg, x).factors(rank)
    stored = _store(cfg, recipe, B, A, x.C)
    target = x.W if cfg.mode == "compress" else dW
    err = target - stored["B"].to(target) @ stored["A"].to(target)
    weight_bits = 0 if cfg.mode == "compress" else q.storage_bits()
    rec.update(rel_output_error=output_error(err, x.C) / ref, factor_bits=stored["bits"],
               bits_per_weight=(weight_bits + stored["bits"]) / q.numel)
    log.debug("compensate %s: rank %d, rel output error %.4g -> %.4g", name, rank, before, rec["rel_output_error"])
    return stored, rec


def _store(cfg: CompensateConfig, recipe: Recipe, B: torch.Tensor, A: torch.Tensor,
           C: torch.Tensor) -> dict[str, Any]:
    """Round the factors as the artifact stores them: {"B", "A" (fp32 as used), "bits", "packed"}."""
    s = quantize_factors(B.cpu(), A.cpu(), cfg.factor_format)
    if cfg.mode != "compress":
        return {"B": s.B, "A": s.A, "bits": s.bits, "packed": dict(s.packed)}
    qb, a_packed = _quantize_projected(B.cpu(), A.cpu(), C.cpu(), recipe), s.packed["lora_A"]
    return {"B": get_format(qb.format).dequantize(qb), "A": s.A, "bits": qb.storage_bits() + _stored_bits(a_packed),
            "packed": {"lora_B": qb, "lora_A": a_packed}}


def _stored_bits(v: torch.Tensor | QTensor) -> int:
    return v.storage_bits() if isinstance(v, QTensor) else v.numel() * v.element_size() * 8


def _quantize_projected(WP: torch.Tensor, Pt: torch.Tensor, C: torch.Tensor, recipe: Recipe) -> QTensor:
    """W P (out, L) in the recipe's weight format; its inputs P^T x have second moments diag(P^T C P)."""
    w = recipe.quantize.weights
    fmt = get_format(w.format)
    ctx = {}
    if recipe.quantize.importance != "none" and "importance" in fmt.context_keys:
        ctx["importance"] = ((Pt.double() @ C.double()) * Pt.double()).sum(1).clamp_min(0).float()
    return fmt.quantize(WP, **w.spec, **ctx)


# ---------------------------------------------------------------- ranks

def _choose_ranks(cfg: CompensateConfig, names: list[str], qtensors: dict[str, QTensor],
                  path_of: Callable[[str], LowRankPath], progress: Progress | None) -> dict[str, int]:
    """One rank for all (capped at min(out, in)), or the budget spread over output-error curves."""
    caps = {n: min(qtensors[n].shape) for n in names}
    if cfg.budget_params is None:
        ranks = {n: min(cfg.rank, caps[n]) for n in names}
        for n in [n for n in names if cfg.rank > caps[n]]:
            log.info("compensate: rank %d capped at %d for layer %s", cfg.rank, caps[n], n)
        return ranks
    # Curves first (one decomposition resident at a time); factors are cut in the second pass.
    curves = {n: path_of(n).curve(caps[n]) for n in track(names, "compensate: error curves", progress)}
    cost = {n: qtensors[n].shape[0] + qtensors[n].shape[1] for n in names}
    return allocate_ranks(curves, cost, cfg.budget_params, caps)


# ---------------------------------------------------------------- writing comp/

def _add_factors(tensors: dict[str, torch.Tensor], name: str, stored: dict[str, Any], cfg: CompensateConfig,
                 q: QTensor) -> dict[str, Any]:
    """Put one layer's factors into `tensors`; return its qconfig.lowrank entry."""
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
        for field in q.data:  # the quantized W is replaced by the factored layer
            tensors.pop(f"{name}.{field}")
    return entry


def _write_comp(quant_dir: Path, qman: dict[str, Any], qconfig: dict[str, Any], tensors: dict[str, torch.Tensor],
                lowrank: dict[str, dict[str, Any]], cfg: CompensateConfig, tmp: Path) -> None:
    qconfig = dict(qconfig)
    qconfig["layers"] = {n: m for n, m in qconfig["layers"].items()
                         if lowrank.get(n, {}).get("mode") != "compress"}
    qconfig["lowrank"] = {"method": cfg.method, "mode": cfg.mode, "factor_format": cfg.factor_format,
                          "layers": lowrank}
    config = json.loads((quant_dir / "config.json").read_text())
    config["quantization_config"] = qconfig
    art.write_json(tmp / "config.json", config)
    art.save_tensors(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    for name in sorted(qman["files"]):
        if name not in ("config.json", WEIGHTS):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes((quant_dir / name).read_bytes())


def _summary(cfg: CompensateConfig, qman: dict[str, Any], records: dict[str, dict[str, Any]],
             qtensors: dict[str, QTensor]) -> dict[str, Any]:
    """Stage summary; bits_per_weight over all target weights, factors included."""
    qsum = qman.get("summary", {})
    params = int(qsum.get("target_params") or sum(q.numel for q in qtensors.values()))
    total = round(float(qman.get("bits_per_weight") or 0.0) * params)
    for name, rec in records.items():
        total += rec["factor_bits"] - (qtensors[name].storage_bits() if rec["mode"] == "compress" else 0)
    n = max(len(records), 1)
    return {"method": cfg.method, "mode": cfg.mode, "factor_format": cfg.factor_format,
            "rank": None if cfg.budget_params else cfg.rank, "budget_params": cfg.budget_params,
            "factor_params": sum(r["rank"] * sum(qtensors[k].shape) for k, r in records.items()),
            "layers": len(records), "quant_bits_per_weight": qman.get("bits_per_weight"),
            "bits_per_weight": total / max(params, 1),
            "rel_output_error_before": sum(r["rel_output_error_before"] for r in records.values()) / n,
            "rel_output_error": sum(r["rel_output_error"] for r in records.values()) / n}
