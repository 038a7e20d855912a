"""The CPU kernel (torch's packed int4 / int8 ops, bf16 inside) against the torch reference in fp32, and the
kernel choice per layer (`kernels.select`, `kernels.use`, LLMQ_KERNEL)."""

from __future__ import annotations

import pytest
import torch

from llmq import kernels, numerics
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.errors import BadInputError
from llmq.kernels import cpu, torch_ref
from llmq.numerics import Scheme

BF16_EPS = 2.0**-8  # unit roundoff of bf16 (8 significant bits)


def make_layer(k: int, n: int, scheme: Scheme, seed: int, bias: bool = True, act_order: bool = False,
               skewed: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if skewed:  # rows of one sign: zero points far from the middle (0 or 2**bits - 1)
        w = w.abs() * torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    g_idx = None
    if act_order:  # as GPTQ's act_order writes it: g_idx[perm[i]] = i // group_size
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // scheme.group_size).to(torch.int32)
    scales, zeros = numerics.minmax_qparams(w, scheme)
    layer = QuantLinear(k, n, bias, scheme, has_g_idx=act_order)
    layer.load_qweight(numerics.quantize(w, scheme, scales, zeros, g_idx))
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=g))
    return layer


def assert_close_to_reference(layer: QuantLinear, x: torch.Tensor) -> None:
    """The kernel's bf16 output against the exact product of the same bf16 input with the fp32 weight.

    Tolerance, per output element: bf16 rounds the output (≤ ε|y|), the scales (≤ ε|w| per weight) and torch's
    zero term (8 - z)·s (≤ ε·8·s per weight, s the weight's group scale), so |y - ref| ≤ ε·Σ|x|(2|w| + 8s) + ε|ref|;
    an fp32 or fp16 input is rounded to bf16 first, which adds ε·Σ|x||w|. We allow twice that. fp32 accumulation
    error is far smaller at these K.
    """
    y = cpu.linear(x, layer)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    ref = torch_ref.linear(x.float(), layer)
    w = torch_ref.dequantized_weight(layer).float()
    qw = numerics.unpack_qweight(layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.scheme, layer.in_features)
    s = numerics._expand(qw.scales.float(), qw.g_idx, layer.in_features, layer.scheme)
    xa = x.float().abs()
    rounded_input = 0 if x.dtype == torch.bfloat16 else 1
    bound = 2 * BF16_EPS * (xa @ ((2 + rounded_input) * w.abs() + 8 * s).t() + ref.abs())
    err = (y.float() - ref).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_path_matches_reference(bits, group, symmetric):
    scheme = Scheme(bits=bits, group_size=group, symmetric=symmetric)
    layer = make_layer(384, 80, scheme, seed=bits * 100 + (group or 0) + symmetric)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert cpu.packed_for(layer).op == "int4"  # the packed op runs, not the fallback
    assert_close_to_reference(layer, x)


@pytest.mark.parametrize("symmetric, skewed", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_per_channel_path_matches_reference(symmetric, skewed, m):
    layer = make_layer(320, 48, Scheme(bits=8, group_size=None, symmetric=symmetric), seed=m, skewed=skewed)
    if skewed:
        zeros = numerics.unpack(layer.qzeros.t(), 8, 48)
        assert set(zeros.flatten().tolist()) <= {0, 255}  # the rank-one zero-point term carries most of the output
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).bfloat16()
    packed = cpu.packed_for(layer)
    assert packed.op == "int8" and (packed.offset is None) == symmetric
    assert_close_to_reference(layer, x)


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_g_idx_is_permuted_once(bits):
    layer = make_layer(256, 32, Scheme(bits=bits, group_size=64), seed=7, act_order=True)
    assert cpu.packed_for(layer).perm is not None
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(2)).bfloat16()  # 3-D input
    assert_close_to_reference(layer, x)


@pytest.mark.parametrize(
    "scheme, k, n, reason",
    [
        (Scheme(bits=4, group_size=32), 96, 40, "out_features 40"),
        (Scheme(bits=4, group_size=16), 96, 48, "group size 16"),
        (Scheme(bits=4, group_size=None), 100, 48, "divides in_features 100"),
        (Scheme(bits=8, group_size=32), 96, 48, "several groups"),
    ],
)
def test_unsupported_layers_take_the_exact_reference(scheme, k, n, reason):
    layer = make_layer(k, n, scheme, seed=3)
    x = torch.randn(4, k).bfloat16()
    assert cpu.packed_for(layer).op is None and reason in cpu.packed_for(layer).reason
    assert torch.equal(cpu.linear(x, layer), torch_ref.linear(x, layer))


@pytest.mark.parametrize("bits, group", [(2, 64), (3, None), (4, 32), (8, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_and_fp16_inputs_run_the_packed_op_in_bf16(bits, group, dtype):
    """from_pretrained's default dtype is fp32: those inputs take the packed op too (rounded to bf16 on the way in,
    cast back on the way out), within the bf16 bound above, and keep their dtype."""
    layer = make_layer(192, 48, Scheme(bits=bits, group_size=group), seed=bits)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(bits)).to(dtype)
    assert cpu.packed_for(layer).op is not None
    assert_close_to_reference(layer, x)


def test_packed_copy_follows_new_weights():
    scheme = Scheme(bits=4, group_size=32)
    layer = make_layer(128, 32, scheme, seed=5)
    x = torch.randn(2, 128).bfloat16()
    first = cpu.linear(x, layer)
    other = make_layer(128, 32, scheme, seed=6)
    for name in ("qweight", "scales", "qzeros", "bias"):
        getattr(layer, name).copy_(getattr(other, name))  # in place, as from_pretrained / load_state_dict do
    assert not torch.equal(cpu.linear(x, layer), first)
    assert torch.equal(cpu.linear(x, layer), cpu.linear(x, other))


def test_select_and_overrides(monkeypatch):
    scheme = Scheme(bits=4, group_size=32)
    assert kernels.select(scheme, "cpu") is cpu.linear
    assert kernels.select(scheme, "meta") is torch_ref.linear
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.select(scheme, "cpu") is torch_ref.linear
    monkeypatch.setenv(kernels.ENV, "fastest")
    with pytest.raises(BadInputError, match="LLMQ_KERNEL"):
        kernels.select(scheme, "cpu")
    monkeypatch.delenv(kernels.ENV)
    model = torch.nn.Sequential(make_layer(64, 16, scheme, seed=8), make_layer(16, 16, Scheme(bits=4, group_size=16), seed=9))
    assert kernels.use(model, "reference") == 2
    assert all(m.kernel is torch_ref.linear for m in model)
    kernels.use(model, "auto")
    assert all(m.kernel is cpu.linear for m in model)


def test_forced_kernel_is_chosen_on_the_first_real_device(monkeypatch):
    """from_pretrained builds QuantLinear on the meta device: a forced kernel is checked when the layer first runs."""
    monkeypatch.setenv(kernels.ENV, "fastest")  # not a kernel: refused on a real device, not while building on meta
    layer = QuantLinear(64, 16, False, Scheme(bits=4, group_size=32), device="meta")
    assert layer.kernel is torch_ref.linear
    layer = layer.to_empty(device="cpu")
    with pytest.raises(BadInputError, match="kernel 'fastest'"):
        layer(torch.randn(2, 64))
    monkeypatch.setenv(kernels.ENV, "reference")
    layer.choose_kernel(torch.device("meta"))
    assert layer(torch.randn(2, 64)).shape == (2, 16) and layer.kernel is torch_ref.linear


def test_in_memory_api_refuses_bitsandbytes_formats(tiny_model_dir):
    import llmq

    model = llmq.load(tiny_model_dir)
    with pytest.raises(BadInputError, match="written by `llmq run`"):
        llmq.quantize(model, llmq.Recipe.from_dict({"model": str(tiny_model_dir), "scheme": "nf4"}))


def test_quantized_model_in_bf16_is_close_to_reference_kernel(tiny_recipe, tmp_path):
    """End to end: an llmq W4 checkpoint loaded in bf16 runs the packed kernel on every layer and gives the same
    logits as the reference kernel on the same bf16 model, to bf16 accuracy."""
    from transformers import AutoModelForCausalLM

    import llmq

    llmq.run(tiny_recipe)  # W4, groups of 32
    model = AutoModelForCausalLM.from_pretrained(tiny_recipe["output"]["dir"], torch_dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids).logits.float()
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(cpu.packed_for(m).op == "int4" for m in layers)
        kernels.use(model, "reference")
        ref = model(ids).logits.float()
    assert (fast - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_bench_commands_report_every_configuration(tiny_recipe, tmp_path, capsys):
    """`llmq bench kernels` / `generate` run end to end on tiny inputs and write what they print (no timing is
    asserted: benchmarks are not tests)."""
    import json

    import llmq
    from llmq.cli import main

    assert main(["bench", "kernels", "--shape", "128x64", "--m", "1", "3", "--group-size", "32", "--rounds", "1",
                 "--device", "cpu", "--json", str(tmp_path / "k.json")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {(r["m"], r["kernel"], r["dtype"]) for r in rows} == {
        (m, k, d) for m in (1, 3) for k, d in (("dense", "float32"), ("dense", "bfloat16"), ("cpu-int4", "bfloat16"), ("reference", "bfloat16"))}
    assert all(r["us"] > 0 and r["group_size"] == 32 for r in rows)
    assert main(["bench", "kernels", "--shape", "64by32"]) == 2 and "expected KxN" in capsys.readouterr().err

    llmq.run(tiny_recipe)
    out = tiny_recipe["output"]["dir"]
    assert main(["bench", "generate", out, "--base", tiny_recipe["model"], "--prompt-tokens", "8", "--new-tokens", "3",
                 "--rounds", "1", "--json", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["base float32", "base bfloat16", "quantized float32", "quantized bfloat16"]
    kernels_used = {r["label"]: r["kernels"] for r in result["rows"]}
    n = len([m for m in llmq.load(out).modules() if isinstance(m, QuantLinear)])
    assert kernels_used["quantized float32"] == {"cpu-int4": n} and kernels_used["quantized bfloat16"] == {"cpu-int4": n}
    assert kernels_used["base float32"] == {} and result["rows"][0]["decode_speedup"] == 1.0
    assert "decode tok/s" in capsys.readouterr().out
