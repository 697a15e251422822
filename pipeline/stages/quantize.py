"""`lpc quantize`: quantize the recipe's targets (or follow an allocation plan) into an lpc model
directory. `quantize.method` names a registered quantize method (quantization/registry.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lpc.pipeline.allocation.plan import read_plan
from lpc.pipeline.artifact import store as art
from lpc.pipeline.artifact.lpc_model import shared_bits, write_lpc_model
from lpc.pipeline.calibration.stored import STATS_FILE, calibration_batches_of, read_stats
from lpc.pipeline.errors import RecipeError
from lpc.pipeline.io.device import check_device
from lpc.pipeline.kvcache import KV_STATS_FILE, check_kv_model, kv_artifact
from lpc.pipeline.kvcache.smooth import SmoothedStore, apply_transforms
from lpc.pipeline.io.families import derive_fuse_groups, layout_config, merge_groups
from lpc.pipeline.io.models import copy_tokenizer_files, find_targets, load_hf_model, model_files, resolve_model
from lpc.pipeline.progress import Progress
from lpc.pipeline.quantization import QUANTIZE_METHODS, TuneInputs
from lpc.pipeline.quantization.actquant import activation_config, activation_plan
from lpc.pipeline.quantization.layers import bits_summary, layer_setups, plan_from_recipe, quantize_layers
from lpc.pipeline.artifact.shards import parse_size
from lpc.pipeline.calibration.stats import check_full_covariance
from lpc.pipeline.io.streaming import tied_names
from lpc.pipeline.stages.base import StageResult, run_stage
from lpc.pipeline.stages.layerwise import open_streamed, quantize_streamed, write_config
from lpc.recipes.schema import Recipe


def quantize(model: str, recipe: Recipe | None, out: Path, calib: Path | None = None, plan: Path | None = None,
             overwrite: bool = False, progress: Progress | None = None, device: str = "cpu",
             max_shard_size: str | int | None = "5GB") -> StageResult:
    """Quantize `model` by `recipe`, or by the allocation artifact `plan` (whose manifest gives the
    recipe and the calibration, unless `recipe` / `calib` are given).

    device: where rounding, scale search, GPTQ and a tuning method compute (CPU is the reference).
    max_shard_size: the largest weight file ('5GB', bytes, or None for one file); above it the
    weights are Hugging Face shards with model.safetensors.index.json.

    A model with a decoder stack is quantized one layer at a time from its checkpoint
    (stages/layerwise.py) unless the recipe needs the whole model at once."""
    device = check_device(device)
    src = resolve_model(model)
    layer_plan, plan_files = None, []
    if plan is not None:
        recipe, layer_plan, plan_files, plan_calib = read_plan(Path(plan), recipe)
        calib = calib or plan_calib
    if recipe is None:
        raise RecipeError("quantize needs a recipe or an allocation plan", "pass --recipe R or --plan alloc/")
    check_kv_model(src, recipe)
    q = recipe.quantize
    method = QUANTIZE_METHODS.get(q.method)
    if (method.needs_calibration or recipe.kv_cache is not None) and calib is None:
        need = "kv_cache" if not method.needs_calibration else f"quantize.method={q.method}"
        raise RecipeError(f"{need} needs a calibration, but no calibration was given",
                          "pass --calib DIR (from `lpc calibrate`), or use `lpc compress`")
    if calib is not None:  # a missing or foreign directory is the user's input error, before any work
        art.read_manifest(calib, "calibrate")
    stats_path = [Path(calib) / STATS_FILE] if calib else []
    stats_path += [Path(calib) / KV_STATS_FILE] if calib and recipe.kv_cache is not None else []
    shard_bytes = parse_size(max_shard_size)
    config = {"model": src, "recipe": recipe.model_dump(mode="json"), "calib": str(calib) if calib else None,
              "plan": str(plan) if plan else None, "max_shard_size": shard_bytes}
    if q.method == "gptq" and calib is not None:
        check_full_covariance(calib, "quantize.method=gptq")

    def body(tmp: Path) -> dict[str, Any]:
        opened = open_streamed(src, recipe, layer_plan, method)
        if opened is not None:
            return _streamed_body(tmp, opened, src, recipe, layer_plan, calib, shard_bytes, progress, device)
        m = load_hf_model(src)
        kv_aux, smooth = kv_artifact(recipe, calib, m)  # KV smoothing folds into q/k/v/o before quantizing
        apply_transforms(m, smooth)
        stats = read_stats(calib) if calib else None
        targets = find_targets(m, recipe.targets, recipe.ignore)
        lp = layer_plan if layer_plan is not None else plan_from_recipe(recipe, list(targets))
        fuse = merge_groups(q.fuse_groups, derive_fuse_groups(m, targets))  # the family's own q/k/v, gate/up
        setups = layer_setups(targets, lp, stats, fuse, q.importance != "none", q.codebook_scope)
        tuned, report, rounded = None, None, {}
        if method.tune is not None:
            x = TuneInputs(m, targets, setups, stats, lp, recipe, calibration_batches_of(calib, src, m), device,
                           progress)
            tuned, report = method.tune(x)
            rounded = x.rounded
        qtensors, records = quantize_layers(targets, lp, stats, progress=progress, method=q.method,
                                            weights=tuned, setups=setups, device=device, rounded=rounded)
        acts, aux = activation_config(recipe, qtensors, stats, lp)
        extra = {"fuse_groups": fuse, **({"activations": acts} if acts else {}), **layout_config(m)}
        if recipe.kv_cache is not None:
            aux = {**aux, **kv_aux}
            extra["kv_cache"] = recipe.kv_cache.model_dump(mode="json")
        write_lpc_model(tmp, m, qtensors, extra_tensors=aux, extra_config=extra or None)
        copy_tokenizer_files(src, tmp)
        summary = bits_summary(m, qtensors, targets)
        _, per_layer = shared_bits(qtensors)
        for name, own in per_layer.items():  # per-layer bits leave out what is stored once for all
            records[name]["bits_per_weight"] = (qtensors[name].storage_bits() - own) / qtensors[name].numel
            records[name]["shared_fields"] = True
        summary["activations"] = q.activations.format if q.activations else None
        if report is not None:
            summary[q.method] = report
        return {"recipe": recipe.model_dump(mode="json"), "layers": records, "summary": summary,
                "bits_per_weight": summary["bits_per_weight"]}

    return run_stage("quantize", out, model_files(src) + stats_path + plan_files, config, overwrite, body)


def _streamed_body(tmp: Path, opened, src: str, recipe: Recipe, layer_plan, calib, shard_bytes, progress,
                   device) -> dict[str, Any]:
    """The body of `quantize` one decoder layer at a time (stages/layerwise.py)."""
    model, _, _ = opened
    kv_aux, smooth = kv_artifact(recipe, calib, model)  # KV smoothing: the layers read smoothed weights
    opened = (model, SmoothedStore(opened[1], smooth), opened[2]) if smooth else opened
    q = recipe.quantize
    stats = read_stats(calib) if calib else None
    targets = find_targets(model, recipe.targets, recipe.ignore)
    lp = layer_plan if layer_plan is not None else plan_from_recipe(recipe, list(targets))
    quantized = [n for n in targets if isinstance(lp.get(n), dict)]
    acts, aux = activation_config(recipe, dict.fromkeys(quantized), stats, lp)
    extra = {"fuse_groups": q.fuse_groups, **({"activations": acts} if acts else {}), **layout_config(model)}
    if recipe.kv_cache is not None:
        aux = {**aux, **kv_aux}
        extra["kv_cache"] = recipe.kv_cache.model_dump(mode="json")
    method = QUANTIZE_METHODS.get(q.method)
    tuner, batches = None, None
    if method.layer_tuner is not None:
        tuner = method.layer_tuner(recipe, activation_plan(acts, aux) if acts else None, model, device)
        batches = _calibration_tokens(calib, src)
    records, metas, count = quantize_streamed(tmp, opened, recipe, lp, stats, shard_bytes, aux, progress, device,
                                              tuner, batches)
    extra["fuse_groups"] = count["fuse_groups"]  # the family's own q/k/v, gate/up, derived layer by layer
    write_config(tmp, model, metas, sorted(tied_names(model)), extra or None)
    copy_tokenizer_files(src, tmp)
    summary = {"bits_per_weight": count["bits"] / max(count["numel"], 1), "quantized_layers": len(metas),
               "target_layers": len(targets), "target_params": count["numel"],
               "activations": q.activations.format if q.activations else None}
    if tuner is not None:
        summary[q.method] = tuner.report()
    return {"recipe": recipe.model_dump(mode="json"), "layers": records, "summary": summary,
            "bits_per_weight": summary["bits_per_weight"]}


def _calibration_tokens(calib, src: str) -> list:
    """The calibration's token sequences without loading the model (unless they were sampled from it)."""
    from lpc.pipeline.artifact.store import read_manifest

    sample_from = load_hf_model(src) if read_manifest(calib, "calibrate")["config"]["data"] == "self" else None
    return calibration_batches_of(calib, src, sample_from)
