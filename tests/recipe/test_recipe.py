"""Recipe validation: every bad recipe is one clear line naming the key; never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmq.errors import BadInputError
from llmq.numerics import SUPPORTED_BITS
from llmq.recipe import PRESETS, Recipe, check_against_layers

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def test_minimal_recipe_defaults():
    r = Recipe.from_dict({"model": "smollm2-135m"})
    assert r.method.name == "rtn" and r.scheme.bits == 4 and r.ignore == ["lm_head"]
    assert r.calibration.data == "lambada" and r.eval.data == "wiki"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = Recipe.from_yaml(path)
    assert r.model and r.output_dir


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets(name):
    r = Recipe.from_dict({"model": "m", "scheme": name})
    assert r.scheme.bits == PRESETS[name]["bits"] and r.scheme.group_size == PRESETS[name]["group_size"]
    assert r.scheme.format == PRESETS[name].get("format", "int")
    if "format" in PRESETS[name]:
        return  # bitsandbytes formats fix the group size (tests/test_bitsandbytes.py)
    over = Recipe.from_dict({"model": "m", "scheme": {"preset": name.lower(), "group_size": 64}})
    assert over.scheme.group_size == 64 and over.scheme.bits == PRESETS[name]["bits"]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"model": "m", "schem": {}}, "schem: unknown key"),
        ({"model": "m", "scheme": {"bitz": 4}}, "scheme.bitz: unknown key"),
        ({"model": "m", "scheme": {"bits": 7}}, "scheme.bits: 7 is not supported"),
        ({"model": "m", "scheme": {"bits": "four"}}, "scheme.bits"),
        ({"model": "m", "scheme": {"group_size": 0}}, "scheme.group_size"),
        ({"model": "m", "scheme": "W5A16"}, "unknown preset"),
        ({"model": "m", "method": "awq"}, "method"),
        ({"model": "m", "method": "qat", "training": {"lr": -1}}, "training.lr"),
        ({"model": "m", "method": "qat", "training": {"budgt": 3}}, "training.budgt: unknown key"),
        ({"model": "m", "method": {"name": "rtn", "act_order": True}}, "method: act_order applies to method gptq"),
        ({"model": "m", "method": {"name": "rtn", "clip": "max"}}, "method.clip"),
        ({"scheme": {"bits": 4}}, "model: required key is missing"),
        ({"model": "m", "targets": ["("]}, "not a valid regular expression"),
        ({"model": "m", "eval": {"data": "lambada"}}, "never calibrate on the evaluation text"),
        ({"model": "m", "eval": {"seqlen": 2}}, "eval.seqlen"),
        ({"model": "m", "output": {"dtype": "int8"}}, "output.dtype"),
    ],
)
def test_bad_recipes_name_the_key(data, expected):
    with pytest.raises(BadInputError) as e:
        Recipe.from_dict(data)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


@pytest.mark.parametrize("data, expected", [
    ({"scheme": {"num_bits": 4}}, "scheme.num_bits: unknown key; llmq calls it bits"),
    ({"scheme": {"strategy": "channel"}}, "strategy: channel is group_size: null"),
    ({"method": {"name": "gptq", "damp_percent": 0.01}}, "method.damp_percent: unknown key; llmq calls it damp"),
    ({"method": {"name": "gptq", "dampening_frac": 0.01}}, "llmq calls it damp"),
    ({"method": {"name": "gptq", "desc_act": True}}, "llmq calls it act_order"),
    ({"method": {"name": "gptq", "actorder": "static"}}, "llmq calls it act_order"),
])
def test_peer_spellings_get_the_llmq_key(data, expected):
    """Keys from llm-compressor / GPTQModel recipes are refused with the llmq name, not just a list of keys."""
    with pytest.raises(BadInputError) as e:
        Recipe.from_dict({"model": "m", **data})
    assert expected in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(BadInputError, match="not valid YAML"):
        Recipe.from_yaml(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(BadInputError, match="expected a mapping"):
        Recipe.from_yaml(p)


def test_group_size_must_divide_every_targeted_layer():
    r = Recipe.from_dict({"model": "m", "scheme": {"bits": 4, "group_size": 128}})
    with pytest.raises(BadInputError, match=r"128 does not divide in_features 576 of model.layers.0.mlp.up_proj"):
        check_against_layers(r, {"model.layers.0.self_attn.q_proj": 1024, "model.layers.0.mlp.up_proj": 576})
    check_against_layers(Recipe.from_dict({"model": "m", "scheme": {"group_size": 64}}), {"a": 576, "b": 1536})
    with pytest.raises(BadInputError, match="select no Linear layer"):
        check_against_layers(r, {})


def test_hash_ignores_key_order():
    a = Recipe.from_dict({"model": "m", "scheme": {"bits": 3, "group_size": 64}})
    b = Recipe.from_dict({"scheme": {"group_size": 64, "bits": 3}, "model": "m"})
    assert a.hash() == b.hash()
    assert a.hash() != Recipe.from_dict({"model": "m", "scheme": {"bits": 4, "group_size": 64}}).hash()


def test_targets_and_ignore():
    r = Recipe.from_dict({"model": "m", "targets": [r".*mlp.*"], "ignore": [r".*down_proj"]})
    assert r.is_targeted("model.layers.0.mlp.up_proj")
    assert not r.is_targeted("model.layers.0.mlp.down_proj")
    assert not r.is_targeted("model.layers.0.self_attn.q_proj")


# ------------------------------------------------------------------------------------------ property-based

KEYS = ["name", "model", "method", "scheme", "targets", "ignore", "calibration", "eval", "output", "bogus"]
SUBKEYS = ["bits", "group_size", "symmetric", "format", "preset", "name", "clip", "clip_grid", "data", "seqlen",
           "n_samples", "max_windows", "batch_size", "dir", "dtype", "seed", "baseline", "oops"]
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 5000), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["rtn", "gptq", "W4A16", "wiki", "lambada", "mse", "float16", "null", "64"]),
)
value = st.recursive(
    leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(SUBKEYS), inner, max_size=4)),
    max_leaves=8,
)
recipes = st.one_of(st.dictionaries(st.sampled_from(KEYS), value, max_size=8), value)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes)
def test_generated_recipes_never_crash(data):
    """Any generated input validates into a Recipe or raises BadInputError with a one-line message."""
    try:
        r = Recipe.from_dict(data)
    except BadInputError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(r, Recipe) and r.scheme.bits in SUPPORTED_BITS


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_generated_yaml_text_never_crashes(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "r.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        Recipe.from_yaml(p)
    except BadInputError as e:
        assert "\n" not in str(e)


def test_the_shipped_recipes_are_found():
    assert len(RECIPES) >= 10  # the parametrized checks above must not pass by finding nothing


def test_recipe_yaml_round_trip(tmp_path):
    r = Recipe.from_yaml(RECIPES[0])
    p = tmp_path / "again.yaml"
    p.write_text(yaml.safe_dump(r.to_dict()))
    assert Recipe.from_yaml(p).hash() == r.hash()



def test_llm_compressor_target_spellings():
    """`re:<regex>` matches from the start of the name (re.match); the class name `Linear` selects every Linear layer;
    plain patterns match the whole name."""
    from llmq.recipe.targets import is_targeted, matches

    name = "model.layers.0.mlp.down_proj"
    assert matches(name, ["re:.*mlp"]) and not matches(name, [".*mlp"])
    assert matches(name, ["Linear"]) and is_targeted("lm_head", ["Linear"], []) and not is_targeted("lm_head", ["Linear"], ["lm_head"])
    r = Recipe.from_dict({"model": "m", "targets": ["Linear"], "ignore": ["re:lm_head"]})
    assert r.is_targeted(name) and not r.is_targeted("lm_head")
