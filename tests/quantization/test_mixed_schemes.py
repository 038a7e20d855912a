"""Per-layer schemes: recipe overrides (first match wins, skip), saved and reloaded exactly; the budget solver
(never over budget, exact against brute force); sensitivity and `llmq run` with a budget, resumed byte-identically."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmq
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.errors import BadInputError
from llmq.kernels.dense import exact_dense
from llmq.numerics import Scheme, stored_bits
from llmq.quantization import budget
from llmq.recipe.targets import layer_schemes

OVERRIDES = [
    {"targets": [r"re:.*\.mlp\.down_proj"], "bits": 8, "group_size": None},
    {"targets": [r".*layers\.1\..*"], "bits": 2},  # layer 1's down_proj was matched above: stays 8-bit
    {"targets": [r".*layers\.0\.self_attn\.q_proj"], "skip": True},
    {"targets": [r".*layers\.0\.self_attn\..*"], "bits": 3, "symmetric": True},
]


def _calibration(tmp_path: Path) -> str:
    from conftest import TEXT

    path = tmp_path / "calib.txt"
    path.write_text(TEXT[::-1] * 2)
    return str(path)


def test_first_override_wins_and_skip_leaves_the_layer_out():
    r = llmq.Recipe.from_dict({"model": "m", "scheme": {"bits": 4, "group_size": 32}, "overrides": OVERRIDES})
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj")]
    got = layer_schemes(r, names)
    assert "model.layers.0.self_attn.q_proj" not in got
    assert got["model.layers.0.self_attn.k_proj"] == Scheme(3, 32, True)
    assert got["model.layers.0.mlp.down_proj"] == got["model.layers.1.mlp.down_proj"] == Scheme(8, None, False)
    assert got["model.layers.1.self_attn.q_proj"] == Scheme(2, 32, False)
    assert got["model.layers.0.mlp.up_proj"] == Scheme(4, 32, False)


@pytest.mark.parametrize("override, message", [
    ({"targets": [".*q_proj"]}, "give the scheme keys that change"),
    ({"targets": [".*q_proj"], "skip": True, "bits": 4}, "give no bits"),
    ({"targets": [".*q_proj"], "bits": 7}, "bits: 7 is not supported"),
    ({"targets": ["(unclosed"], "bits": 4}, "not a valid regular expression"),
    ({"targets": [".*q_proj"], "preset": "NF4"}, "unknown preset"),
    ({"targets": [".*q_proj"], "bits": 4, "num_bits": 4}, "num_bits"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(BadInputError, match="overrides") as e:
        llmq.Recipe.from_dict({"model": "m", "overrides": [override]})
    assert message in str(e.value)


def test_override_errors_that_need_the_model(tiny_recipe):
    tiny_recipe["overrides"] = [{"targets": [".*nonexistent"], "bits": 8}]
    with pytest.raises(BadInputError, match=r"overrides\[0\].targets .* match no targeted Linear layer"):
        llmq.validate(tiny_recipe)
    tiny_recipe["overrides"] = [{"targets": [".*down_proj"], "group_size": 48}]  # in_features 128
    with pytest.raises(BadInputError, match=r"overrides\[0\].group_size: 48 does not divide in_features 128 of model.layers.0.mlp.down_proj"):
        llmq.validate(tiny_recipe)
    tiny_recipe["overrides"] = [{"targets": [".*"], "skip": True}]
    with pytest.raises(BadInputError, match="skip every targeted layer"):
        llmq.validate(tiny_recipe)
    tiny_recipe["scheme"] = "NF4"
    tiny_recipe["overrides"] = [{"targets": [".*down_proj"], "bits": 8}]
    with pytest.raises(BadInputError, match="overrides and budgets mix integer schemes only"):
        llmq.validate(tiny_recipe)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_checkpoint_saves_reloads_identically(tiny_recipe, tmp_path, method):
    tiny_recipe["overrides"] = OVERRIDES
    tiny_recipe["method"] = {"name": method, "act_order": True} if method == "gptq" else method
    if method == "gptq":
        tiny_recipe["calibration"] = {"data": _calibration(tmp_path), "n_samples": 4, "seqlen": 32, "batch_size": 2}
    result = llmq.run(tiny_recipe)
    out = result.output_dir
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 2
    assert qc["layers"]["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": None, "sym": False}
    assert "model.layers.0.mlp.up_proj" not in qc["layers"]  # the default scheme is not repeated
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    q = reloaded.model.layers[0].self_attn.q_proj
    assert type(q) is torch.nn.Linear  # skipped: its original weights, byte for byte
    base = AutoModelForCausalLM.from_pretrained(tiny_recipe["model"]).eval()
    assert torch.equal(q.weight, base.model.layers[0].self_attn.q_proj.weight)
    schemes = {n: m.scheme for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert schemes["model.layers.1.self_attn.v_proj"] == Scheme(2, 32, False)
    assert schemes["model.layers.0.self_attn.k_proj"] == Scheme(3, 32, True)
    assert len(schemes) == 13
    with safe_open(out / "model-00001-of-00003.safetensors", "pt") as f:  # 8-bit per channel: one scale per row
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").shape == (1, 64)

    model = AutoModelForCausalLM.from_pretrained(tiny_recipe["model"], dtype=torch.float32).eval()
    calib = None
    if method == "gptq":  # the same windows llmq run drew
        from llmq.calibration import calibration_batches
        from llmq.loading import load_tokenizer
        calib = calibration_batches(result.recipe.calibration, load_tokenizer(tiny_recipe["model"]))
    llmq.quantize(model, result.recipe, calibration=calib)
    x = torch.randint(0, reloaded.config.vocab_size, (2, 19))
    with torch.no_grad(), exact_dense(reloaded), exact_dense(model):
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_in_memory_api_refuses_a_budget(tiny_recipe):
    model = AutoModelForCausalLM.from_pretrained(tiny_recipe["model"], dtype=torch.float32)
    recipe = llmq.Recipe.from_dict({**tiny_recipe, "scheme": {"budget": {"bits_per_weight": 4}}})
    with pytest.raises(BadInputError, match="scheme.budget: the in-memory API takes schemes as given"):
        llmq.quantize(model, recipe)


def test_in_memory_mixed_model_saves_and_reloads(tiny_recipe, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_recipe["model"], dtype=torch.float32).eval()
    recipe = llmq.Recipe.from_dict({**tiny_recipe, "overrides": OVERRIDES})
    llmq.quantize(model, recipe)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    x = torch.randint(0, reloaded.config.vocab_size, (2, 11))
    with torch.no_grad(), exact_dense(reloaded), exact_dense(model):
        assert torch.equal(reloaded(x).logits, model(x).logits)


# ------------------------------------------------------------------------------------------------- the solver


def test_solver_matches_brute_force_and_never_exceeds():
    rng = random.Random(0)
    for _ in range(300):
        n, k = rng.randint(1, 5), rng.randint(1, 4)
        sizes = [[rng.randint(1, 40) for _ in range(k)] for _ in range(n)]
        scores = [[rng.random() for _ in range(k)] for _ in range(n)]
        cap = rng.randint(sum(map(min, sizes)), sum(map(max, sizes)))
        picks = budget.solve(sizes, scores, cap)
        assert sum(sizes[i][c] for i, c in enumerate(picks)) <= cap
        best = min(sum(scores[i][c] for i, c in enumerate(a)) for a in itertools.product(range(k), repeat=n)
                   if sum(sizes[i][c] for i, c in enumerate(a)) <= cap)
        assert sum(scores[i][c] for i, c in enumerate(picks)) == pytest.approx(best, abs=1e-12)


def test_solver_never_offers_a_candidate_that_does_not_fit():
    rng = random.Random(2)
    for _ in range(200):
        n, k = rng.randint(1, 4), rng.randint(2, 4)
        sizes = [[rng.randint(1, 30) if rng.random() > 0.3 else None for _ in range(k)] for _ in range(n)]
        for s in sizes:
            s[rng.randrange(k)] = s[rng.randrange(k)] or rng.randint(1, 30)  # at least one fits each layer
        scores = [[rng.random() for _ in range(k)] for _ in range(n)]
        least = sum(min(b for b in s if b is not None) for s in sizes)
        cap = rng.randint(least, least + 40)
        picks = budget.solve(sizes, scores, cap)
        assert all(sizes[i][c] is not None for i, c in enumerate(picks))
        options = [[c for c in range(k) if sizes[i][c] is not None] for i in range(n)]
        best = min(sum(scores[i][c] for i, c in enumerate(a)) for a in itertools.product(*options)
                   if sum(sizes[i][c] for i, c in enumerate(a)) <= cap)
        assert sum(scores[i][c] for i, c in enumerate(picks)) == pytest.approx(best, abs=1e-12)


def test_solver_rounds_sizes_up_on_large_budgets():
    rng = random.Random(1)
    sizes = [[rng.randint(10**6, 10**7) for _ in range(3)] for _ in range(50)]
    scores = [[rng.random() for _ in range(3)] for _ in range(50)]
    cap = sum(map(min, sizes)) + 10**7 + 7
    picks = budget.solve(sizes, scores, cap)
    assert sum(sizes[i][c] for i, c in enumerate(picks)) <= cap


def test_solver_says_when_rounding_leaves_no_room():
    sizes = [[10**6 - 5]] * 10  # 10^7 - 50 bits in all: fits a budget of exactly that ...
    cap = sum(s[0] for s in sizes)  # ... cut into units of 50 bits, each layer rounds up to 20000 units: 1 too many
    with pytest.raises(BadInputError, match="once each layer's size is rounded up"):
        budget.solve(sizes, [[1.0]] * 10, cap)


def test_solver_with_one_candidate_is_uniform_and_refuses_too_small():
    assert budget.solve([[5], [7], [3]], [[1.0], [2.0], [3.0]], 15) == [0, 0, 0]
    with pytest.raises(BadInputError, match="below the smallest assignment"):
        budget.solve([[5], [7], [3]], [[1.0], [2.0], [3.0]], 14)


@pytest.mark.parametrize("act_order, dtype", [(False, "float32"), (True, "float16")])
def test_stored_bits_are_the_bytes_on_disk(tiny_recipe, tmp_path, act_order, dtype):
    from llmq.checkpoint.safetensors_io import tensor_bytes

    recipe = {**tiny_recipe, "overrides": OVERRIDES, "eval": None, "output": {**tiny_recipe["output"], "dtype": dtype}}
    if act_order:  # g_idx on disk for every layer
        recipe.update(method={"name": "gptq", "act_order": True},
                      calibration={"data": _calibration(tmp_path), "n_samples": 2, "seqlen": 32, "batch_size": 2})
    out = llmq.run(recipe).output_dir
    sizes = tensor_bytes(out)
    assert any(k.endswith(".g_idx") for k in sizes) == act_order
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, m in reloaded.named_modules():
        if isinstance(m, QuantLinear):
            on_disk = 8 * sum(sizes.get(f"{name}.{leaf}", 0) for leaf in ("qweight", "scales", "qzeros", "g_idx"))
            assert stored_bits(m.out_features, m.in_features, m.scheme, getattr(torch, dtype), act_order) == on_disk, name


# ------------------------------------------------------------------------------------------- budgets end to end


def _budget_recipe(tiny_recipe, tmp_path, **b):
    return {**tiny_recipe, "eval": None, "method": "gptq",
            "calibration": {"data": _calibration(tmp_path), "n_samples": 4, "seqlen": 32, "batch_size": 2},
            "scheme": {"bits": 3, "group_size": 32, "budget": {"candidates": ["W2g32", "W3g32", "W4g32", "W8"], **b}}}


def _bits_of(out: Path) -> tuple[int, int]:
    """(stored bits, weights) over the quantized Linear layers (a quantized embedding not among them)."""
    model = AutoModelForCausalLM.from_pretrained(out)
    q = [m for m in model.modules() if type(m) is QuantLinear]
    return sum(stored_bits(m.out_features, m.in_features, m.scheme, m.scales.dtype, False) for m in q), \
        sum(m.out_features * m.in_features for m in q)


def test_budget_run_meets_bits_per_weight_and_resumes_byte_identically(tiny_recipe, tmp_path, monkeypatch):
    from conftest import killed_at_block_1

    recipe = _budget_recipe(tiny_recipe, tmp_path, bits_per_weight=4.2)
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    with killed_at_block_1(monkeypatch), pytest.raises(RuntimeError, match="killed"):
        llmq.run(recipe)
    resumed = llmq.run(recipe)
    assert resumed.report["quantization"]["resumed_at_block"] == 1
    record = resumed.report["quantization"]["budget"]
    assert record["sensitivity"]["cached"] is None  # the resume took the choice the killed run kept, as it was made
    bits, weights = _bits_of(resumed.output_dir)
    assert bits == record["used_bits"] <= record["budget_bits"] == int(4.2 * weights)
    assert len(set(record["layers"].values())) > 1  # it mixed
    fresh = llmq.run(recipe, output_dir=tmp_path / "fresh")
    for f in sorted(resumed.output_dir.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "fresh" / f.name).read_bytes(), f.name
    saved = llmq.Recipe.from_yaml(resumed.output_dir / "recipe.yaml")  # the resolved recipe: no budget, all layers named
    assert saved.scheme.budget is None and len(saved.overrides) == 14
    assert fresh.report["quantization"]["budget"]["layers"] == record["layers"]
    assert fresh.report["quantization"]["budget"]["sensitivity"]["cached"]  # a new run reuses the measurement
    assert not list(resumed.output_dir.glob("llmq-*"))  # no resume files in the checkpoint
    for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
        for block in range(2):  # tied by default: layers reading one input share a scheme (vLLM fuses them)
            assert len({record["layers"][f"model.layers.{block}.{n}"] for n in group}) == 1
    card = (resumed.output_dir / "README.md").read_text()
    assert "mixed-precision (default 3-bit)" in card and "## Per-layer schemes" in card and record["used"] in card
    from llmq.evaluation.checkpoint_info import describe_checkpoint

    info = describe_checkpoint(str(resumed.output_dir), resumed.output_dir)
    assert info["scheme"].startswith("mixed") and info["bits"] == pytest.approx(bits / weights, abs=1e-3)
    assert info["method_s"] == round(resumed.report["timings"]["quantize_s"], 1)  # the leaderboard's "method s"


def test_untied_budget_and_the_units_it_solves_for():
    free = [f"m.layers.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "o", "up", "down")]
    tied = budget.units(free, "m.layers", [["q", "k", "v"], ["o"], ["up"], ["down"]], tie=True)
    assert tied[0] == ["m.layers.0.q", "m.layers.0.k", "m.layers.0.v"] and len(tied) == 8
    assert budget.units(free, "m.layers", [["q", "k", "v"]], tie=False) == [[n] for n in free]
    assert budget.units(["lm_head", "m.layers.0.q"], "m.layers", [["q"]], tie=True) == [["lm_head"], ["m.layers.0.q"]]


@pytest.mark.parametrize("embedding", [None, "W4g32"])
def test_size_budget_counts_the_whole_checkpoint(tiny_recipe, tmp_path, monkeypatch, embedding):
    """size_mb holds for the files on disk, with the token embedding in full precision or quantized (scheme.embedding:
    its packed table counts instead, and the bits it frees go to the layers)."""
    from llmq.checkpoint.safetensors_io import weights_bytes
    from llmq.evaluation.checkpoint_info import describe_checkpoint, stored_bits_per_weight

    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    recipe = _budget_recipe(tiny_recipe, tmp_path, size_mb=0.12)
    recipe["scheme"]["embedding"] = embedding
    small = llmq.run(recipe)
    tensor_bytes = 0
    for f in small.output_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            tensor_bytes += sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())
    used = small.report["quantization"]["budget"]["used_bits"]
    assert tensor_bytes * 8 < used <= 0.12 * 8e6  # used: the tensors plus a bound on the headers
    assert tensor_bytes < weights_bytes(small.output_dir) <= used / 8  # the files on disk fit the budget
    layers_bpw = stored_bits_per_weight(small.output_dir)  # over the Linear layers only, the table not among them
    bits, weights = _bits_of(small.output_dir)
    if embedding is None:
        assert layers_bpw == pytest.approx(bits / weights)
    else:
        info = describe_checkpoint(str(small.output_dir), small.output_dir)
        assert info["scheme"].endswith("embedding W4g32 asym") and info["bits"] == pytest.approx(layers_bpw, abs=1e-3)
        plain = llmq.run({**_budget_recipe(tiny_recipe, tmp_path, size_mb=0.12)}, output_dir=tmp_path / "plain")
        assert layers_bpw > stored_bits_per_weight(plain.output_dir)  # the table's savings bought finer layers
    with pytest.raises(BadInputError, match=r"scheme.budget.size_mb: 0.01 is below the smallest model"):
        llmq.validate(_budget_recipe(tiny_recipe, tmp_path, size_mb=0.01))


def test_sensitivity_orders_candidates_and_layers(tiny_model_dir, tmp_path, monkeypatch):
    """Coarser candidates score higher on every layer; each layer's coarsest score is the block output's relative
    error, token by token, with that layer alone quantized (checked here by running the block again)."""
    from llmq.quantization import sensitivity

    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "cache"))
    recipe = llmq.Recipe.from_dict({"model": str(tiny_model_dir), "scheme": {"budget": {"bits_per_weight": 4}}})
    cands = [Scheme(2, 32), Scheme(4, 32), Scheme(8, None)]
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    scores, facts = sensitivity.measure(recipe, tiny_model_dir, calib, cands, names, torch.float32, torch.device("cpu"))
    assert facts["cached"] is None and set(scores) == set(names)
    for n, s in scores.items():
        assert s[0] > s[1] > s[2] >= 0, n
    again, facts = sensitivity.measure(recipe, tiny_model_dir, calib, cands, names, torch.float32, torch.device("cpu"))
    assert facts["cached"] and again == scores

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    from llmq.calibration import capture_inputs
    from llmq.methods.rtn import quantize_weight
    from llmq.numerics import dequantize

    block = model.model.layers[1]
    with torch.no_grad():
        inputs = capture_inputs(model, model.model.layers[0], [calib[:2]], "cpu")
        inputs.advance(model.model.layers[0])
        ref = inputs.outputs(block)
        w = block.mlp.down_proj.weight.data.clone()
        block.mlp.down_proj.weight.data = dequantize(quantize_weight(w, cands[0], recipe.method, torch.float32), cands[0])
        out = inputs.outputs(block)
    err = ((out[0] - ref[0]).double().pow(2).sum(-1) / ref[0].double().pow(2).sum(-1)).mean().item()  # per token
    assert scores["model.layers.1.mlp.down_proj"][0] == pytest.approx(err, rel=1e-6)


@pytest.mark.parametrize("mode", ["whole-model", "blockwise"])
def test_qat_trains_each_layer_in_its_own_scheme(tiny_model_dir, tmp_path, mode):
    """QAT (whole model and block-wise) with overrides: each FakeQuantLinear trains in its layer's scheme, and the
    converted model saves and reloads with exactly the in-memory logits."""
    method = {"name": "qat", "init": "rtn"} if mode == "whole-model" else {"name": "qat", "mode": "blockwise", "block_epochs": 1}
    recipe = llmq.Recipe.from_dict({
        "model": str(tiny_model_dir), "method": method, "scheme": {"bits": 4, "group_size": 32}, "eval": None,
        "overrides": OVERRIDES, "calibration": {"n_samples": 4, "seqlen": 32, "batch_size": 2},
        **({"training": {"seqlen": 32, "batch_size": 4, "micro_batch_size": 2, "budget": {"steps": 2}, "lr": 1e-3}}
           if mode == "whole-model" else {}),
    })
    windows = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(3))
    from llmq.quantization import blockwise, qat

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if mode == "whole-model":
        qweights = qat.quantize_model(plain, recipe, torch.float32, windows, windows[:4]).qweights
    else:
        qweights = blockwise.quantize_model(plain, recipe, torch.float32, windows[:4])[0]
    expected = layer_schemes(recipe, list(qweights))
    for name, qw in qweights.items():  # the trained codes span their own layer's grid, no wider
        assert int(qw.q.max()) <= expected[name].maxq and int(qw.q.max()) >= expected[name].maxq // 2, name
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    llmq.quantize(model, recipe, calibration=windows[:4], training=windows)
    schemes = {n: m.scheme for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert schemes["model.layers.1.self_attn.v_proj"] == Scheme(2, 32, False)
    assert schemes["model.layers.0.mlp.down_proj"] == Scheme(8, None, False) and len(schemes) == 13
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad(), exact_dense(reloaded), exact_dense(model):
        assert torch.equal(reloaded(x).logits, model(x).logits)
