"""A KV cache policy in `lpc eval`: the recipe's kv_cache section, the --kv-policy / --kv-budget options,
and perplexity through the policy on the tiny Llama."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lpc.cli.main import app
from lpc.pipeline.stages.evaluate import evaluate_model
from lpc.recipes import RecipeError, load_recipe


def test_the_recipe_names_a_policy_and_its_budget():
    kv = load_recipe("fp8", ["kv_cache={policy: thinkv, budget: 0.1}"]).kv_cache
    assert (kv.policy, kv.budget, kv.format) == ("thinkv", 0.1, "bf16")
    kv = load_recipe("fp8", ["kv_cache={policy: uniform, budget: 0.2, policy_options: {level: int2}}"]).kv_cache
    assert kv.policy_options == {"level": "int2"}


@pytest.mark.parametrize("section, message", [
    ("{policy: lru, budget: 0.1}", "unknown KV cache policy 'lru'"),
    ("{policy: h2o}", "needs kv_cache.budget"),
    ("{policy: h2o, budget: 1.5}", "budget"),
    ("{format: fp8_e4m3, policy: h2o, budget: 0.1}", "chooses the KV precision itself"),
    ("{format: fp8_e4m3, budget: 0.1}", "need kv_cache.policy"),
])
def test_bad_policy_sections_are_refused(section, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("fp8", [f"kv_cache={section}"])


def test_the_recipe_knows_every_registered_policy_and_options_are_checked_at_evaluation(tiny_model_dir, text_files):
    from lpc.pipeline.errors import InputError
    from lpc.pipeline.kvcache.policy import POLICIES, make_policy
    from lpc.recipes.schema import KV_POLICIES

    make_policy("streaming", 0.5)  # registers them all
    assert sorted(POLICIES.names()) == sorted(KV_POLICIES)
    with pytest.raises(InputError, match="precision level"):
        evaluate_model(str(tiny_model_dir), ppl=[str(text_files["txt"])], seq_len=64,
                       kv_policy={"policy": "uniform", "budget": 0.1, "policy_options": {"level": "int3"}})


def test_perplexity_through_a_policy(tiny_model_dir, text_files):
    plain = evaluate_model(str(tiny_model_dir), ppl=[str(text_files["txt"])], seq_len=64)
    full = evaluate_model(str(tiny_model_dir), ppl=[str(text_files["txt"])], seq_len=64,
                          kv_policy={"policy": "thinkv", "budget": 1.0})
    small = evaluate_model(str(tiny_model_dir), ppl=[str(text_files["txt"])], seq_len=64,
                           kv_policy={"policy": "streaming", "budget": 0.1})
    f = str(text_files["txt"])
    assert full["perplexity"][f] == pytest.approx(plain["perplexity"][f], rel=1e-4)
    assert small["perplexity"][f] != pytest.approx(plain["perplexity"][f], rel=1e-4)
    d = small["details"][f]
    assert d["tokens"] == plain["details"][f]["tokens"] and 0 < d["held_fraction"] <= 0.1


def test_eval_command_takes_a_policy(tiny_model_dir, text_files):
    runner = CliRunner()
    ok = runner.invoke(app, ["eval", str(tiny_model_dir), "--ppl", str(text_files["txt"]), "--seq-len", "64",
                             "--kv-policy", "h2o", "--kv-budget", "0.2", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output[ok.output.index("{"):])  # after the progress lines
    assert report["perplexity"][str(text_files["txt"])] > 1
    bad = runner.invoke(app, ["eval", str(tiny_model_dir), "--ppl", str(text_files["txt"]), "--kv-policy", "lru",
                              "--kv-budget", "0.2"])
    assert bad.exit_code == 1 and "unknown KV cache policy 'lru'" in " ".join(bad.output.split())
    alone = runner.invoke(app, ["eval", str(tiny_model_dir), "--ppl", str(text_files["txt"]), "--kv-policy", "h2o"])
    assert alone.exit_code == 1 and "go together" in alone.output


def test_an_artifact_with_a_policy_is_evaluated_through_it(tmp_path, tiny_model_dir, text_files):
    from lpc.pipeline import stages

    recipe = load_recipe("fp8", ["calibrate.samples=4", "calibrate.seq_len=32",
                                 "kv_cache={policy: streaming, budget: 0.1}"])
    calib = stages.calibrate(str(tiny_model_dir), str(text_files["jsonl"]), tmp_path / "c", recipe).out
    quant = stages.quantize(str(tiny_model_dir), recipe, tmp_path / "q", calib=calib).out
    f = str(text_files["txt"])
    with_policy = evaluate_model(str(quant), ppl=[f], seq_len=64)
    assert "KV policy streaming" in with_policy["details"][f]["protocol"]
    assert 0 < with_policy["details"][f]["held_fraction"] <= 0.1
    with pytest.raises(Exception, match="do not run through a KV cache policy"):
        evaluate_model(str(quant), tasks=["arc_easy"])
