"""QuantLinear as a torch.compile citizen (the custom op `llmq::dequant_linear`, prepared packed copies, fullgraph
traces of a tiny Llama) and the dense kernel that makes exact fp32 evaluations run at the base model's speed."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernel import make_layer  # pytest puts this folder on sys.path

import llmq
from llmq import kernels, numerics
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.kernels import cpu, dense, torch_ref
from llmq.numerics import Scheme


def _op_args(layer: QuantLinear, x: torch.Tensor) -> tuple:
    s = layer.scheme
    return (x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.bias, s.bits, s.group_size, s.symmetric,
            s.format, layer.in_features)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32, 64])
def test_opcheck_dequant_linear(bits, group):
    """torch.library.opcheck: schema, fake (meta) implementation, and dispatch agree for every bit width and group."""
    layer = make_layer(192, 40, Scheme(bits=bits, group_size=group), seed=bits + (group or 0), bias=bits % 2 == 0,
                       act_order=group == 64)
    for x in (torch.randn(3, 192), torch.randn(2, 5, 192).bfloat16()):
        torch.library.opcheck(torch.ops.llmq.dequant_linear.default, _op_args(layer, x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 32])
def test_op_equals_plain_dequantize_then_linear(bits, group):
    layer = make_layer(96, 24, Scheme(bits=bits, group_size=group), seed=11 * bits)
    x = torch.randn(4, 96)
    qw = numerics.unpack_qweight(layer.qweight, layer.scales, layer.qzeros, None, layer.scheme, 96)
    plain = torch.nn.functional.linear(x, numerics.dequantize(qw, layer.scheme), layer.bias)
    assert torch.equal(torch_ref.linear(x, layer), plain)


@pytest.mark.parametrize("bits, group, act_order", [(2, 32, False), (3, None, False), (4, 64, True), (8, None, False),
                                                    (8, 32, False), (4, 16, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_kernel_is_bit_identical_to_reference(bits, group, act_order, dtype):
    layer = make_layer(128, 48, Scheme(bits=bits, group_size=group), seed=bits, act_order=act_order)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(bits)).to(dtype)
    assert torch.equal(dense.linear(x, layer), torch_ref.linear(x, layer))
    first = layer.__dict__[dense.ATTR]
    dense.linear(x, layer)
    assert layer.__dict__[dense.ATTR] is first  # dequantized once, kept
    layer.scales.mul_(2)  # weights written in place: the dense copy is rebuilt
    assert torch.equal(dense.linear(x, layer), torch_ref.linear(x, layer))


def test_exact_dense_scopes_fp32_layers_and_restores_their_kernels(monkeypatch):
    fp32 = make_layer(64, 16, Scheme(bits=4, group_size=32), seed=1)
    forced = make_layer(64, 16, Scheme(bits=4, group_size=32), seed=2)
    forced.choose_kernel(torch.device("cpu"), "reference")
    half = QuantLinear(64, 16, False, Scheme(bits=4, group_size=32), dtype=torch.bfloat16)
    model = torch.nn.ModuleList([fp32, forced, half])
    x = torch.randn(3, 64)
    with dense.exact_dense(model) as switched:
        assert switched == 1 and fp32.kernel is dense.linear
        assert half.kernel is cpu.linear  # bf16 layers keep their fast kernel
        assert forced.kernel is torch_ref.linear  # a kernel the user chose is respected
        assert torch.equal(fp32(x), torch_ref.linear(x, fp32))
    assert fp32.kernel is cpu.linear and forced.kernel is torch_ref.linear
    assert dense.ATTR not in fp32.__dict__  # the full-precision copy is freed on leaving
    monkeypatch.setenv(kernels.ENV, "cpu")  # evaluating the CPU kernel on purpose
    with dense.exact_dense(model) as switched:
        assert switched == 0 and fp32.kernel is cpu.linear


def _tiny_quantized(tiny_model_dir, scheme: dict, dtype: str = "float32"):
    model = llmq.load(tiny_model_dir)
    llmq.quantize(model, llmq.Recipe.from_dict({"model": str(tiny_model_dir), "scheme": scheme, "method": "rtn",
                                                "output": {"dtype": dtype}}))
    return model.eval()


@pytest.mark.parametrize("scheme, dtype, served", [
    ({"bits": 4, "group_size": 32}, "float32", "int4"),
    ({"bits": 3, "group_size": 32}, "bfloat16", "int4"),
    ({"bits": 8, "group_size": None}, "float32", "int8"),
    ({"bits": 4, "group_size": 16}, "float32", None),  # a group size the CPU ops refuse: the custom op serves it
])
def test_fullgraph_compile_of_a_tiny_llama(tiny_model_dir, scheme, dtype, served):
    """torch.compile(fullgraph=True) traces the whole quantized model: any graph break would raise. The traced graph
    (AOT autograd, eager kernels: the tracing is what is under test) gives the eager logits."""
    model = _tiny_quantized(tiny_model_dir, scheme, dtype)
    assert kernels.prepare(model) > 0
    layers = kernels.quantized_layers(model)
    assert {cpu.packed_for(m).op for m in layers} == {served}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert torch.equal(compiled, eager)


def test_inductor_compile_matches_eager_and_needs_prepared_layers(tiny_model_dir):
    """The real compiler on the CPU: same logits as eager within fp32 rounding; and a layer whose packed copy was
    never built refuses to be traced with a message that says what to do."""
    model = _tiny_quantized(tiny_model_dir, {"bits": 4, "group_size": 32})
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    kernels.prepare(model)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()
    layer = kernels.quantized_layers(model)[0]
    kernels.drop_derived(layer)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="prepare"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(ids)


def test_from_pretrained_prepares_the_packed_copies(tiny_recipe):
    """A checkpoint loaded with from_pretrained is ready to compile: every layer's packed copy exists already."""
    from transformers import AutoModelForCausalLM

    llmq.run(tiny_recipe)
    model = AutoModelForCausalLM.from_pretrained(tiny_recipe["output"]["dir"])
    layers = kernels.quantized_layers(model)
    assert layers and all(cpu.ATTR in m.__dict__ and m.__dict__[cpu.ATTR].op == "int4" for m in layers)


@pytest.mark.slow
def test_bench_generate_compile_runs_every_model_eager_and_compiled(tiny_recipe, tmp_path):
    """`llmq bench generate --compile`: generate() with a static cache for each model, eager and compiled, on the
    real compiler (no timing asserted); the compiled rows really ran the compiled forward."""
    import json

    from llmq.cli import main

    llmq.run(tiny_recipe)
    out = tiny_recipe["output"]["dir"]
    assert main(["bench", "generate", out, "--base", tiny_recipe["model"], "--dtype", "bfloat16", "--compile",
                 "--prompt-tokens", "8", "--new-tokens", "3", "--rounds", "1", "--json", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["base bfloat16", "base bfloat16 compiled", "quantized bfloat16",
                                                    "quantized bfloat16 compiled"]
    assert result["mode"] == "generate, static cache" and all(r["decode_tok_s"] > 0 for r in result["rows"])
    assert result["rows"][3]["kernels"] == {"cpu-int4": len(kernels.quantized_layers(llmq.load(out)))}
