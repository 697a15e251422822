"""Recipe schema: every built-in validates, overrides apply, bad keys and values are named."""
from __future__ import annotations

import pytest

from lpc.recipes import RecipeError, apply_overrides, list_recipes, load_recipe


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_builtin_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description and "lm_head" in recipe.ignore


def test_expected_builtins_exist():
    assert {"nvfp4", "fp8", "fgmp_nvfp4", "fgmp_nvfp4a16", "vapr", "nvfp4_eora", "mxfp4", "mxfp8",
            "int4", "bcq"} <= set(list_recipes())


def test_overrides_reach_nested_fields_and_create_sections():
    r = load_recipe("fgmp_nvfp4a16", ["allocate.policy=random", "allocate.fraction=0.1",
                                      "compensate.rank=4", "quantize.weights.spec.scale_search=3"])
    assert (r.allocate.policy, r.allocate.fraction, r.compensate.rank) == ("random", 0.1, 4)
    assert r.quantize.weights.spec == {"scale_search": 3}
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


@pytest.mark.parametrize("sets, message", [
    (["calbrate.samples=3"], "unknown key 'calbrate' (valid keys here: name, description"),
    (["allocate.polcy=fgmp"], "unknown key 'allocate.polcy'"),
    (["allocate.policy=vapr"], "the vapr policy needs a budget: set allocate.budget_bits"),
    (["compensate.mode=compress"], "compensate.mode=compress needs method espace"),
    (["allocate.fraction=1.5"], "allocate.fraction=1.5"),
    (["compensate.rank=0"], "compensate.rank=0"),
    (["quantize.weights.spec.clip=octav"], "nvfp4 does not support clip='octav'"),
    (["noequals"], "bad override 'noequals'"),
])
def test_bad_recipes_name_the_problem(sets, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("fgmp_nvfp4a16", sets)
    assert message in str(err.value)


def test_recipe_files(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nquantize:\n  weights: {format: mxfp8}\n")
    assert load_recipe(str(path)).quantize.weights.format == "mxfp8"
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
