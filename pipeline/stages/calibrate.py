"""`lpc calibrate`: input statistics (absmax, X^T X / n or its diagonal, as the recipe needs) of the
recipe's targets, and Fisher with `calibrate.fisher`, written to calib/stats.safetensors one decoder
layer at a time (the model streamed from its checkpoint). Data-parallel under torchrun."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lpc.pipeline.artifact import store as art
from lpc.pipeline.artifact.shards import ShardWriter
from lpc.pipeline.calibration.fisher_layerwise import final_head
from lpc.pipeline.calibration.stats import (InputStats, collect_input_stats, needs_covariance, needs_statistics,
                                            stats_tensors)
from lpc.pipeline.calibration.stored import STATS_FILE, data_inputs
from lpc.pipeline.io import distributed as dd
from lpc.pipeline.io.data import calibration_batches
from lpc.pipeline.io.device import check_device
from lpc.pipeline.io.models import find_targets, load_hf_model, load_tokenizer, model_files, resolve_model
from lpc.pipeline.io.streaming import open_for_calibration
from lpc.pipeline.kvcache import check_kv_model
from lpc.pipeline.progress import Progress
from lpc.pipeline.quantization.experts import stand_in_statistics
from lpc.pipeline.stages.base import StageResult, run_stage
from lpc.recipes.schema import Recipe


def calibrate(model: str, data: str, out: Path, recipe: Recipe, overwrite: bool = False,
              device: str = "cpu", progress: Progress | None = None) -> StageResult:
    """Collect input statistics (and Fisher with recipe.calibrate.fisher) of the recipe's targets."""
    device = check_device(device)
    c = recipe.calibrate
    src = resolve_model(model)
    check_kv_model(src, recipe)
    config = {"model": src, "data": data, "samples": c.samples, "seq_len": c.seq_len, "fisher": c.fisher,
              "seed": c.seed, "targets": recipe.targets, "ignore": recipe.ignore,
              "kv_cache": recipe.kv_cache is not None,
              "statistics": "covariance" if needs_covariance(recipe) else "diagonal"}
    parallel = dd.start(device)
    if not needs_statistics(recipe) and not parallel:  # data-free rounding: no forward pass, no data read
        config["statistics"] = "none"
        return run_stage("calibrate", out, [], config, overwrite, _data_free)
    ran = [False]
    if parallel and (c.fisher or data == "self" or recipe.kv_cache is not None):
        dd.refuse("calibration with Fisher, kv_cache or --data self")

    def body(tmp: Path) -> dict[str, Any]:
        if parallel and dd.rank() == 0:
            ran[0] = True
            dd.broadcast_flag(True)  # the other ranks follow into the computation
        tok = load_tokenizer(src)
        # `--data self` (generation) needs the whole model; statistics and Fisher (layer-wise
        # backward) stream one decoder layer at a time from the checkpoint.
        opened = None if data == "self" or not Path(src).is_dir() else \
            open_for_calibration(src, recipe.targets, recipe.ignore)
        if opened and c.fisher and final_head(opened[0]) is None:
            opened = None  # layer-wise Fisher knows Llama-style heads only: the whole model then
        m, store = opened if opened else (load_hf_model(src), None)
        targets = find_targets(m, recipe.targets, recipe.ignore)
        every = calibration_batches(data, tok, c.samples, c.seq_len, model=m, seed=c.seed)
        batches = dd.my_share(every) if parallel else every
        writer = ShardWriter(tmp, None, filename=STATS_FILE)
        written: set[str] = set()
        idle: list[str] = []

        def write_out(done: dict[str, Any]) -> None:
            """Finished layers' statistics go to disk and are dropped from memory."""
            idle.extend(stand_in_statistics(done))  # MoE experts no token was routed to
            writer.add(stats_tensors(done))
            written.update(done)
            for s in done.values():
                s.cov, s.extra = torch.empty(0), {}  # the statistics live on disk now

        def spill(done: dict[str, Any]) -> None:
            """A layer's input statistics, unless its Fisher is still to come (then `spill_fisher` writes it)."""
            if not c.fisher:
                write_out(done)

        def spill_fisher(done: dict[str, dict[str, Any]]) -> None:
            """A layer whose Fisher is final (layer-wise Fisher), with its input statistics."""
            _put_fisher(stats, done)
            write_out({n: stats[n] for n in done})

        full = config["statistics"] == "covariance"
        if c.fisher and not full and _one_pass(m, store, targets, batches, recipe):
            # the input statistics are measured in Fisher's own layer-by-layer forward pass (the same bits)
            stats = {n: InputStats.empty(mod.in_features, full) for n, mod in targets.items()}
            kv_found = {}
            _add_fisher(m, batches, targets, stats, progress, device, store, on_layer=spill_fisher, park_dir=tmp,
                        input_stats=stats)
        else:
            with _kv_recording(m, recipe, store) as kv_result:  # K/V statistics in the same layer-by-layer pass
                stats = collect_input_stats(m, batches, targets, progress, device, store=store, full=full,
                                            on_layer=spill)
                kv_found = kv_result() if kv_result is not None else {}
            if c.fisher:
                _add_fisher(m, batches, targets, stats, progress, device, store, on_layer=spill_fisher,
                            park_dir=tmp)
        rest = {n: s for n, s in stats.items() if n not in written}
        idle.extend(stand_in_statistics(rest))
        writer.add(stats_tensors(rest))
        writer.close(metadata={"format": "pt"})
        if recipe.kv_cache is not None:
            if kv_found:
                from lpc.pipeline.kvcache import KV_STATS_FILE, kv_stat_tensors

                art.save_tensors(kv_stat_tensors(kv_found), tmp / KV_STATS_FILE)
            else:
                _add_kv_stats(src, m, store, batches, tmp, progress, device)
        tokens = sum(b.shape[1] for b in every)
        layers = {n: {"in_features": mod.in_features, "out_features": mod.out_features, "rows": stats[n].count}
                  for n, mod in targets.items()}
        return {"layers": layers, "summary": {"samples": len(every), "tokens": tokens, "layers": len(layers),
                                             "fisher": c.fisher, "kv_cache": recipe.kv_cache is not None,
                                             **({"experts_without_tokens": idle} if idle else {})}}

    inputs = model_files(src) + data_inputs(data)
    if parallel and dd.rank() != 0:
        return _follow_rank0(out, body)
    try:
        result = run_stage("calibrate", out, inputs, config, overwrite, body)
    except BaseException:
        if parallel and not ran[0]:
            dd.broadcast_flag(False)
        raise
    if parallel and result.skipped:
        dd.broadcast_flag(False)
    return result


def _data_free(tmp: Path) -> dict[str, Any]:
    """The calibration of a recipe that reads no statistics: an empty statistics file."""
    ShardWriter(tmp, None, filename=STATS_FILE).close(metadata={"format": "pt"})
    return {"layers": {}, "summary": {"samples": 0, "tokens": 0, "layers": 0, "fisher": False, "kv_cache": False,
                                      "statistics": "none: the recipe's rounding reads no statistics"}}


def _follow_rank0(out: Path, body) -> StageResult:
    """A rank other than 0: compute alongside rank 0 (when it computes) and write nothing."""
    import tempfile

    if not dd.broadcast_flag(None):
        return StageResult("calibrate", Path(out), {}, skipped=True)
    with tempfile.TemporaryDirectory(prefix="lpc-rank-") as scratch:
        body(Path(scratch))
    return StageResult("calibrate", Path(out), {"summary": {"rank": dd.rank()}})


def _put_fisher(stats, fisher: dict[str, dict[str, Any]]) -> None:
    """Fisher diagonals into each target's statistics (`weight_fisher`, `act_fisher`, fp32 on CPU)."""
    for name, f in fisher.items():
        stats[name].extra["weight_fisher"] = f["weight_fisher"].float().cpu()
        stats[name].extra["act_fisher"] = f["act_fisher"].float().cpu()


def _one_pass(model, store, targets, batches, recipe: Recipe) -> bool:
    """Whether layer-wise Fisher's forward pass also measures the (diagonal) input statistics: a streamed
    Llama-style skeleton whose targets are all inside its decoder stack, no K/V recording, every sample
    >= 2 tokens. A full X^T X stays in a pass of its own, finished layer by layer: held in fp64 across
    Fisher's chunks of samples it would grow with depth."""
    from lpc.pipeline.io.models import decoder_layers

    found = decoder_layers(model)
    return (store is not None and found is not None and final_head(model) is not None
            and recipe.kv_cache is None and all(n.startswith(found[0] + ".") for n in targets)
            and all(b.numel() >= 2 for b in batches))


def _add_fisher(model, batches, targets, stats, progress, device, store=None, on_layer=None, park_dir=None,
                input_stats=None) -> None:
    """Fisher statistics of every target into `stats`; layer-wise on a streamed skeleton, where each layer's
    are handed to `on_layer` (written out) as soon as they are final instead, and `input_stats` (when
    given) are measured in the same forward pass."""
    from lpc.pipeline.calibration.fisher import fisher_statistics
    from lpc.pipeline.calibration.fisher_layerwise import final_head, layerwise_fisher
    from lpc.pipeline.io.models import decoder_layers

    found = decoder_layers(model)
    if store is not None and found and final_head(model) is not None:
        from lpc.pipeline.io.streaming import materialize, release

        path, layers = found
        fisher = layerwise_fisher(model, batches, targets, found, progress=progress, device=device,
                                  load=lambda i: materialize(layers[i], f"{path}.{i}", store),
                                  free=lambda i: release(layers[i]), on_layer=on_layer,
                                  park_dir=park_dir, input_stats=input_stats)
    else:
        model.to(device)
        fisher = fisher_statistics(model, [b.to(device) for b in batches], targets, progress=progress)
        model.to("cpu")
    _put_fisher(stats, fisher)


@contextmanager
def _kv_recording(model, recipe: Recipe, store):
    """For a KV recipe on a streamed skeleton: the decoder layers record K/V as the statistics pass runs
    them (yields the result function); otherwise yields None (a separate whole-model pass follows)."""
    from lpc.pipeline.io.models import decoder_layers

    found = decoder_layers(model) if recipe.kv_cache is not None and store is not None else None
    if found is None:
        yield None
        return
    from lpc.pipeline.kvcache.calibrate import recording_layers

    with recording_layers(model, found[1]) as result:
        yield result


def _add_kv_stats(src, model, store, batches, tmp: Path, progress, device) -> None:
    """K/V absmax per layer and head, as the cache stores them (keys after RoPE): a forward pass of the
    whole model per sequence (a streamed skeleton is replaced by the loaded model for this pass)."""
    from lpc.pipeline.kvcache import KV_STATS_FILE, kv_stat_tensors, kv_statistics

    whole = load_hf_model(src) if store is not None else model
    whole.to(device)
    try:
        stats = kv_statistics(whole, [b.to(device) for b in batches], progress)
    finally:
        whole.to("cpu")
    art.save_tensors(kv_stat_tensors(stats), tmp / KV_STATS_FILE)
