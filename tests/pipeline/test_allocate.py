"""The allocate stage on the tiny Llama: FGMP plans, baselines, activation mixing, VaPr search; GPTQ."""
from __future__ import annotations

import json

import pytest
import torch

from lpc.formats import get_format
from lpc.pipeline import stages
from lpc.pipeline.allocation.plan import read_plan
from lpc.pipeline.stages.allocate import allocate
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.quantization.gptq import gptq_quantize
from lpc.pipeline.artifact.load import load
from lpc.recipes import load_recipe

SMALL = ["calibrate.samples=4", "calibrate.seq_len=24"]


@pytest.fixture(scope="module")
def fisher_calib(tmp_path_factory, tiny_model_dir, text_files):
    d = tmp_path_factory.mktemp("alloc")
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), d / "calib", load_recipe("fgmp_nvfp4", SMALL))
    return d


def _quantize_with(plan_dir, recipe, tiny_model_dir, out):
    return stages.quantize(str(tiny_model_dir), recipe, out, plan=plan_dir, calib=plan_dir.parent / "calib")


@pytest.mark.parametrize("policy", ["fgmp", "random", "magnitude"])
def test_block_policies_keep_exactly_the_fraction(fisher_calib, tiny_model_dir, policy):
    recipe = load_recipe("fgmp_nvfp4a16", SMALL + [f"allocate.policy={policy}", "allocate.fraction=0.25"])
    res = allocate(fisher_calib / "calib", recipe, fisher_calib / f"a-{policy}")
    plan = json.loads((fisher_calib / f"a-{policy}" / "plan.json").read_text())
    assert res.manifest["summary"]["high_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert all(e["format"] == "fgmp" for e in plan["layers"].values())
    q = _quantize_with(fisher_calib / f"a-{policy}", recipe, tiny_model_dir, fisher_calib / f"q-{policy}")
    assert q.manifest["bits_per_weight"] == pytest.approx(res.manifest["bits_per_weight"], rel=1e-9)
    assert q.manifest["bits_per_weight"] > 4.5 + 3.5 * 0.25  # plus mask bits and padding of odd widths


def test_fgmp_differs_from_baselines_and_is_deterministic(fisher_calib):
    masks = {}
    for policy in ("fgmp", "magnitude"):
        recipe = load_recipe("fgmp_nvfp4a16", SMALL + [f"allocate.policy={policy}", "allocate.fraction=0.25"])
        allocate(fisher_calib / "calib", recipe, fisher_calib / f"d-{policy}")
        masks[policy] = (fisher_calib / f"d-{policy}" / "masks.safetensors").read_bytes()
    assert masks["fgmp"] != masks["magnitude"]
    recipe = load_recipe("fgmp_nvfp4a16", SMALL + ["allocate.fraction=0.25"])
    allocate(fisher_calib / "calib", recipe, fisher_calib / "d-again")
    assert (fisher_calib / "d-again" / "masks.safetensors").read_bytes() == masks["fgmp"]


def test_fgmp_with_activations_attaches_mixing_hooks(fisher_calib, tiny_model_dir, text_files):
    recipe = load_recipe("fgmp_nvfp4", SMALL)
    res = allocate(fisher_calib / "calib", recipe, fisher_calib / "a-act")
    assert res.manifest["summary"]["activation_threshold"] is not None
    _quantize_with(fisher_calib / "a-act", recipe, tiny_model_dir, fisher_calib / "q-act")
    with_acts, tok = load(fisher_calib / "q-act")
    weights_only, _ = load(fisher_calib / "q-act", activations=False)
    ids = tok("the sun was warm and the birds sang", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = with_acts(ids).logits, weights_only(ids).logits
    assert not torch.equal(a, b) and torch.isfinite(a).all()


def test_fgmp_needs_fisher(tmp_path, tiny_model_dir, text_files):
    recipe = load_recipe("fgmp_nvfp4a16", SMALL + ["calibrate.fisher=false"])
    stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "calib", recipe)
    with pytest.raises(InputError, match="calibrate with --fisher"):
        allocate(tmp_path / "calib", recipe, tmp_path / "a")


def test_vapr_respects_budget_and_writes_pareto(fisher_calib, tiny_model_dir):
    recipe = load_recipe("vapr", SMALL + ["allocate.budget_bits=6.0", "allocate.pareto_budgets=[5.0,6.0,8.0]"])
    res = allocate(fisher_calib / "calib", recipe, fisher_calib / "a-vapr")
    assert res.manifest["bits_per_weight"] <= 6.0
    front = json.loads((fisher_calib / "a-vapr" / "pareto.json").read_text())["points"]
    assert [p["budget_bits_per_weight"] for p in front] == [5.0, 6.0, 8.0]
    assert front[0]["predicted_loss"] >= front[1]["predicted_loss"] >= front[2]["predicted_loss"]
    assert (fisher_calib / "a-vapr" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = _quantize_with(fisher_calib / "a-vapr", recipe, tiny_model_dir, fisher_calib / "q-vapr")
    assert q.manifest["bits_per_weight"] == pytest.approx(res.manifest["bits_per_weight"], rel=1e-9)
    with pytest.raises(RecipeError):
        allocate(fisher_calib / "calib", load_recipe("vapr", SMALL + ["allocate.budget_bits=2.0"]),
                 fisher_calib / "a-vapr-low")


def test_vapr_is_exact_on_stored_bits(fisher_calib, caplog):
    """Costs are the exact stored bits (rows of 40 pad to blocks: non-dyadic bits per weight), so
    the DP grid is never coarsened and the stage records a proven optimum."""
    recipe = load_recipe("vapr", SMALL + ["allocate.budget_bits=6.0", "allocate.pareto_budgets=[]",
                                          "allocate.refine=false"])
    with caplog.at_level("WARNING"):
        res = allocate(fisher_calib / "calib", recipe, fisher_calib / "a-vapr-exact")
    assert res.manifest["summary"]["exact"] is True
    assert "rounded up" not in caplog.text
    assert res.manifest["bits_per_weight"] <= 6.0


def test_vapr_costs_the_model_wide_codebook_once(fisher_calib, tiny_model_dir):
    from lpc.pipeline.artifact.store import load_tensors
    from lpc.pipeline.artifact.lpc_model import read_qconfig, read_qtensors

    # Rows of 32 and 40 pad to bcq's arrays of 64: ~9.3 bits here, bf16 16 bits.
    cands = "allocate.candidates=[{format: bcq}, {format: bf16}]"
    recipe = load_recipe("vapr", SMALL + ["allocate.budget_bits=12.0", "allocate.pareto_budgets=[]",
                                          "allocate.refine=false", cands])
    res = allocate(fisher_calib / "calib", recipe, fisher_calib / "a-vapr-bcq")
    plan = json.loads((fisher_calib / "a-vapr-bcq" / "plan.json").read_text())
    chosen = [n for n, e in plan["layers"].items() if e["format"] == "bcq"]
    assert chosen and len(chosen) < len(plan["layers"])  # a mix, so the budget binds
    assert all(plan["layers"][n]["codebook"] == "codebook.16" for n in chosen)
    book = load_tensors(fisher_calib / "a-vapr-bcq" / "masks.safetensors")["codebook.16"]
    q = _quantize_with(fisher_calib / "a-vapr-bcq", recipe, tiny_model_dir, fisher_calib / "q-vapr-bcq")
    qts, _ = read_qtensors(fisher_calib / "q-vapr-bcq", read_qconfig(fisher_calib / "q-vapr-bcq"))
    assert all(torch.equal(qts[n].data["codebook"], book) for n in chosen)
    # The plan's bits are the artifact's (codebook stored once), and within the budget.
    assert q.manifest["bits_per_weight"] == pytest.approx(res.manifest["bits_per_weight"], rel=1e-9)
    assert 11.0 < res.manifest["bits_per_weight"] <= 12.0


def test_gptq_lowers_output_error_and_stores_a_plain_qtensor():
    torch.manual_seed(0)
    mix = torch.randn(48, 48)
    x = torch.randn(2000, 48) @ mix                   # strongly correlated inputs
    cov = x.T @ x / x.shape[0]
    w = torch.randn(40, 48)
    fmt = get_format("nvfp4")
    amax = w.abs().amax()
    rtn = fmt.dequantize(fmt.quantize(w, global_amax=amax))
    q = gptq_quantize(w, cov, "nvfp4", {}, {"global_amax": amax})
    g = fmt.dequantize(q)

    def out_err(wq):
        e = w - wq
        return float(((e @ cov) * e).sum())

    assert q.format == "nvfp4" and q.data["qdata"].shape == (40, 24)
    assert out_err(g) < 0.8 * out_err(rtn)


def test_inspect_reports_mix_and_draws_precision_map(fisher_calib, tiny_model_dir, tmp_path):
    from lpc.pipeline.artifact.inspect import inspect_artifact

    recipe = load_recipe("fgmp_nvfp4a16", SMALL + ["allocate.fraction=0.5"])
    allocate(fisher_calib / "calib", recipe, fisher_calib / "a-inspect")
    _quantize_with(fisher_calib / "a-inspect", recipe, tiny_model_dir, fisher_calib / "q-inspect")
    info = inspect_artifact(fisher_calib / "q-inspect", plot=tmp_path / "map.png")
    assert {r["format"] for r in info["layers"]} == {"fgmp"} and len(info["layers"]) == 14
    assert all(r["bits"] > 4.5 for r in info["layers"]) and info["bits_per_weight"] > 6.0
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("policy", ["fgmp", "random", "magnitude", "fgmp+activations"])
def test_block_plans_stream_and_equal_the_whole_model_plan(fisher_calib, policy, monkeypatch):
    """Weight scores read one weight at a time, activation scores run one decoder layer at a time: the
    model is never loaded whole and the plan (masks, threshold, importances) is the same bytes."""
    import sys

    stage = sys.modules[allocate.__module__]  # the module (the package re-exports the function by its name)
    name, _, acts = policy.partition("+")
    recipe = load_recipe("fgmp_nvfp4" if acts else "fgmp_nvfp4a16",
                         SMALL + [f"allocate.policy={name}", "allocate.fraction=0.3"])
    whole = fisher_calib / f"w-{policy}"
    with monkeypatch.context() as m:  # the whole-model path: no streaming
        m.setattr(stage, "open_stack", lambda *a, **k: None)
        allocate(fisher_calib / "calib", recipe, whole)

    def refuse(*_a, **_k):
        raise AssertionError("the whole model was loaded for a block plan")

    monkeypatch.setattr(stage, "load_hf_model", refuse)
    allocate(fisher_calib / "calib", recipe, fisher_calib / f"s-{policy}")
    for f in ("masks.safetensors", "plan.json"):
        assert (fisher_calib / f"s-{policy}" / f).read_bytes() == (whole / f).read_bytes()


@pytest.mark.parametrize("extra", [[], ["allocate.budget_bits=12.0", "allocate.pareto_budgets=[]",
                                          "allocate.candidates=[{format: bcq}, {format: bf16}]"]])
def test_vapr_streams_and_equals_the_whole_model_search(fisher_calib, monkeypatch, extra):
    """VaPr with the Fisher predictor, refinement and a Pareto front: options scored one weight at a time,
    each measured plan walked one decoder layer at a time (its layers quantized as they come): the model is
    never loaded whole, and the plan, the codebook and every measured loss equal the whole-model search."""
    import sys

    stage = sys.modules[allocate.__module__]
    recipe = load_recipe("vapr", SMALL + ["allocate.budget_bits=6.0", "allocate.pareto_budgets=[5.0,8.0]"] + extra)
    whole = fisher_calib / f"vw-{len(extra)}"
    with monkeypatch.context() as m:
        m.setattr(stage, "open_stack", lambda *a, **k: None)
        w = allocate(fisher_calib / "calib", recipe, whole)

    def refuse(*_a, **_k):
        raise AssertionError("the whole model was loaded for a VaPr search with the Fisher predictor")

    monkeypatch.setattr(stage, "load_hf_model", refuse)
    streamed = fisher_calib / f"vs-{len(extra)}"
    s = allocate(fisher_calib / "calib", recipe, streamed)
    for f in ("masks.safetensors", "plan.json") + (() if extra else ("pareto.json",)):
        assert (streamed / f).read_bytes() == (whole / f).read_bytes(), f
    assert s.manifest["summary"] == w.manifest["summary"]
    assert s.manifest["summary"]["measured_loss"] != s.manifest["summary"]["baseline_loss"] > 0  # plans measured


def test_plan_reads_fisher_importances_only_when_a_layer_is_quantized(fisher_calib):
    """An FGMP plan with sensitivity clipping refers to each layer's weight Fisher: read_plan keeps a
    reference (as large as the weights in fp32, it is read layer by layer when quantized)."""
    from lpc.pipeline.calibration.stored import StatRef, read_stats, resolve_refs

    recipe = load_recipe("fgmp_nvfp4a16", SMALL + ["allocate.fraction=0.25"])
    allocate(fisher_calib / "calib", recipe, fisher_calib / "lazy")
    _, plan, _, _ = read_plan(fisher_calib / "lazy")
    entries = {n: e for n, e in plan.items() if isinstance(e, dict) and "context" in e}
    assert entries and all(isinstance(e["context"]["importance"], StatRef) for e in entries.values())
    name = next(iter(entries))
    ctx = resolve_refs(entries[name]["context"])
    assert torch.equal(ctx["importance"], read_stats(fisher_calib / "calib")[name]["weight_fisher"])
    assert ctx["mask"].dtype == torch.bool
