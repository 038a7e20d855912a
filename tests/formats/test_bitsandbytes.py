"""bitsandbytes formats: llmq's NF4 / FP4 math against bitsandbytes' own, GPTQ onto the codebook, and checkpoints
that plain transformers + bitsandbytes load with no llmq import (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import llmq
from llmq import numerics
from llmq.errors import BadInputError
from llmq.formats import bitsandbytes as bnb_format
from llmq.methods.gptq import Hessian, gptq_quantize
from llmq.methods.rtn import quantize_weight
from llmq.numerics import Scheme
from llmq.recipe import MethodConfig, Recipe

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

FORMATS = ["nf4", "fp4"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_codebooks_are_bitsandbytes_tables(fmt):
    assert torch.equal(torch.tensor(numerics.CODEBOOKS[fmt]), F.get_4bit_type(fmt, device="cpu"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(32, 128), (7, 192)])
def test_rtn_codebook_equals_bitsandbytes_quantization(fmt, shape):
    """Absmax per block of 64 + nearest level = bitsandbytes' quantize_4bit: same values, same storage bytes."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
    scheme = Scheme(bits=4, group_size=64, symmetric=True, format=fmt)
    qw = numerics.quantize(w, scheme)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=fmt)
    assert torch.equal(qw.scales.reshape(-1), state.absmax)
    assert torch.equal(numerics.dequantize(qw, scheme), F.dequantize_4bit(packed, state))
    if fmt == "nf4":  # fp4 has +0 and -0: equal values, either code
        assert torch.equal(bnb_format.pack_nibbles(qw.q), packed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_onto_codebook_beats_rtn_codebook_on_correlated_inputs(fmt):
    k = 128
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(2048, k, generator=g) @ mix) * (torch.rand(k, generator=g) * 3 + 0.1)
    w = torch.randn(40, k, generator=g)
    h = Hessian(k)
    h.add(x)
    scheme = Scheme(bits=4, group_size=64, symmetric=True, format=fmt)
    qw, _, _ = gptq_quantize(w, h.H, scheme, MethodConfig(name="gptq", act_order=True, static_groups=True))
    rtn = quantize_weight(w, scheme, MethodConfig(), torch.float32)

    def err(q):
        return (x @ (numerics.dequantize(q, scheme) - w).t()).pow(2).mean().item()

    assert qw.zeros is None and qw.g_idx is None and int(qw.q.max()) <= 15
    assert err(qw) < 0.8 * err(rtn), (err(qw), err(rtn))


def test_mse_clipping_with_a_codebook_never_worse_than_absmax():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    scheme = Scheme(bits=4, group_size=64, symmetric=True, format="nf4")
    s_mse, z = numerics.mse_qparams(w, scheme, grid=20, max_shrink=0.3)
    s_abs, _ = numerics.minmax_qparams(w, scheme)
    assert z is None and torch.all(s_mse <= s_abs)

    def group_err(s):
        deq = numerics.dequantize(numerics.quantize(w, scheme, s, None), scheme)
        return (deq - w).pow(2).reshape(16, 2, 64).sum(-1)

    assert torch.all(group_err(s_mse) <= group_err(s_abs) + 1e-6)


@pytest.mark.parametrize(
    "scheme, method, match",
    [
        ({"format": "nf4", "bits": 3}, "rtn", "bits: format nf4 needs 4"),
        ({"format": "nf4", "group_size": 128}, "rtn", "group_size: format nf4 needs 64"),
        ({"format": "int8"}, "gptq", "cannot produce format int8"),
        ({"format": "fp4"}, "qat", "cannot produce format fp4"),
        ({"format": "nf4"}, {"name": "rtn", "clip": "mse"}, "clip must be minmax"),
        ({"format": "nf4"}, {"name": "gptq", "act_order": True}, "act_order needs static_groups"),
    ],
)
def test_recipe_refuses_what_bitsandbytes_cannot_store(scheme, method, match):
    with pytest.raises(BadInputError, match=match):
        Recipe.from_dict({"model": "m", "method": method, "scheme": scheme})


def test_presets_fill_bitsandbytes_schemes():
    s = Recipe.from_dict({"model": "m", "scheme": "nf4"}).scheme
    assert (s.format, s.bits, s.group_size, s.symmetric) == ("nf4", 4, 64, True)
    s = Recipe.from_dict({"model": "m", "scheme": "llm_int8"}).scheme
    assert (s.format, s.bits, s.group_size) == ("int8", 8, None)


PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    assert not any(m.startswith("llmq") for m in sys.modules), "llmq was imported"
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 100, 3]])
    with torch.no_grad():
        logits = model(ids).logits.float()
    json.dump({"kinds": kinds, "logits": logits.flatten().tolist()}, sys.stdout)
    """
)


def plain_transformers(folder) -> dict:
    """Load `folder` with transformers alone in a fresh interpreter; its Linear classes and some logits."""
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("method, fmt", [("rtn", "nf4"), ("gptq", "nf4"), ("gptq", "fp4"), ("rtn", "int8")])
def test_run_saves_bitsandbytes_checkpoints_plain_transformers_loads(tiny_recipe, method, fmt):
    from transformers import AutoModelForCausalLM

    tiny_recipe.update(method=method, scheme={"format": fmt})
    if method == "gptq":
        tiny_recipe["method"] = {"name": "gptq", "act_order": True, "static_groups": True}
        tiny_recipe["calibration"] = {"data": "lambada", "n_samples": 4, "seqlen": 64}
    result = llmq.run(tiny_recipe)
    out = result.output_dir
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_4bit" if fmt != "int8" else "load_in_8bit"]
    assert not list(out.glob("*.partial*")) and not list(out.parent.glob(".*partial*"))
    card = (out / "README.md").read_text()
    assert "bitsandbytes' own serialization" in card and "import llmq" not in card and f"format: {fmt}" in card
    plain = plain_transformers(out)
    assert plain["kinds"] == (["Linear", "Linear4bit"] if fmt != "int8" else ["Linear", "Linear8bitLt"])
    assert all(math.isfinite(v) for v in plain["logits"])
    q = result.metrics["quantized"]["ppl"]
    assert math.isfinite(q) and q < 3 * result.metrics["base"]["ppl"]
    if method == "rtn":  # bitsandbytes' own quantization: exactly what transformers makes of the base model
        ref = bnb_format.quantize_with_bitsandbytes(tiny_recipe["model"], Scheme(format=fmt, bits=4 if fmt != "int8" else 8,
                                                                                   group_size=64 if fmt != "int8" else None,
                                                                                   symmetric=True), torch.float32,
                                                    [n for n in _linears(tiny_recipe["model"]) if n != "lm_head"])
        with torch.no_grad():
            expected = ref(torch.tensor([[1, 5, 9, 23, 42, 7, 100, 3]])).logits.float().flatten()
        assert torch.allclose(torch.tensor(plain["logits"]), expected, atol=1e-5, rtol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ in ("Linear4bit", "Linear8bitLt")


def _linears(folder) -> list[str]:
    from llmq.model import structure

    return [n for n, m in structure.skeleton(folder).named_modules() if isinstance(m, torch.nn.Linear)]


def test_write_codes_round_trips_through_plain_transformers(tiny_model_dir, tmp_path):
    """Codes and absmax written by llmq come back from the saved file exactly (bitsandbytes dequantizes them)."""
    scheme = Scheme(bits=4, group_size=64, symmetric=True, format="nf4")
    names = [n for n in _linears(tiny_model_dir) if n != "lm_head"]
    model = bnb_format.quantize_with_bitsandbytes(tiny_model_dir, scheme, torch.float32, names)
    g = torch.Generator().manual_seed(3)
    qweights = {}
    for name in names:
        layer = model.get_submodule(name)
        out, inp = layer.out_features, layer.in_features
        qweights[name] = numerics.QWeight(torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8),
                                          torch.rand(out, inp // 64, generator=g) + 0.01, None)
    bnb_format.write_codes(model, qweights, scheme)
    model.save_pretrained(tmp_path / "nf4")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    for name, qw in qweights.items():
        w = loaded.get_submodule(name).weight
        assert torch.equal(F.dequantize_4bit(w.data, w.quant_state), numerics.dequantize(qw, scheme))
