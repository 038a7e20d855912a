"""GPTQ numerics against plain references: identity Hessian = RTN, lower output error than RTN on correlated
inputs, act_order / static_groups, dead inputs, damping recovery, the Hessian itself, determinism; then the
block walk (generic block discovery, true-sequential clusters) and tiny models end to end through `llmq run`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq import calibration, numerics
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.kernels.dense import exact_dense
from llmq.methods.gptq import Hessian, gptq_quantize, inverse_factor
from llmq.methods.rtn import quantize_weight
from llmq.model import structure
from llmq.numerics import Scheme
from llmq.recipe import MethodConfig

SCHEMES = [
    Scheme(bits, group, sym)
    for bits in (2, 3, 4, 8)
    for group in (None, 32, 64)
    for sym in (False, True)
]


def _gptq(**kw) -> MethodConfig:
    return MethodConfig(name="gptq", **kw)


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1  # uneven input magnitudes, as in real activations
    return (torch.randn(n, k, generator=g) @ mix) * scale


def _output_error(x: torch.Tensor, w: torch.Tensor, qw, scheme) -> float:
    return (x @ (numerics.dequantize(qw, scheme) - w).t()).pow(2).mean().item()


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_identity_hessian_equals_rtn(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    qw, loss, damp = gptq_quantize(w, torch.eye(128), scheme, _gptq())
    ref = quantize_weight(w, scheme, MethodConfig(), torch.float32)
    assert torch.equal(qw.q, ref.q) and torch.equal(qw.scales, ref.scales)
    assert (qw.zeros is None) == (ref.zeros is None) and (qw.zeros is None or torch.equal(qw.zeros, ref.zeros))
    assert qw.g_idx is None and damp == 0.01 and loss > 0


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.bits < 8], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_output_error_than_rtn_on_correlated_inputs(scheme, act_order):
    """With act order GPTQ beats RTN everywhere here (measured error ratios 0.39-0.69); in natural order it does at
    3 and 4 bits and 2-bit per-channel (0.41-0.68) but not reliably at 2 bits with groups (0.83-1.1: group qparams
    come from weights the error updates have already pushed around), which is why act_order matters most there."""
    if scheme.bits == 2 and scheme.group_size is not None and not act_order:
        pytest.skip("natural-order grouped GPTQ is not reliably better than RTN at 2 bits (see docstring)")
    k = 128
    x = _correlated_inputs(2048, k, seed=scheme.bits)
    w = torch.randn(40, k, generator=torch.Generator().manual_seed(7))
    h = Hessian(k)
    h.add(x)
    qw, _, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=act_order))
    rtn = quantize_weight(w, scheme, MethodConfig(), torch.float32)
    e_gptq, e_rtn = _output_error(x, w, qw, scheme), _output_error(x, w, rtn, scheme)
    assert e_gptq < (0.8 if act_order else 0.9) * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_act_order_static_groups_has_no_g_idx_and_matches_the_g_idx_path(bits, symmetric):
    scheme = Scheme(bits, 32, symmetric)
    k = 96
    x = _correlated_inputs(1024, k, seed=bits)
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(3))
    h = Hessian(k)
    h.add(x)
    static, _, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=True, static_groups=True))
    dynamic, _, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=True))
    assert static.g_idx is None
    assert dynamic.g_idx is not None and sorted(torch.bincount(dynamic.g_idx).tolist()) == [32, 32, 32]
    # the static layout means exactly what the same codes with an explicit trivial g_idx mean
    explicit = static._replace(g_idx=numerics.default_g_idx(k, scheme))
    assert torch.equal(numerics.dequantize(static, scheme), numerics.dequantize(explicit, scheme))
    # both act-order variants land within rounding of each other and well below RTN
    e_static, e_dyn = _output_error(x, w, static, scheme), _output_error(x, w, dynamic, scheme)
    e_rtn = _output_error(x, w, quantize_weight(w, scheme, MethodConfig(), torch.float32), scheme)
    assert e_static < e_rtn and e_dyn < e_rtn
    assert 0.5 < e_static / e_dyn < 2.0


def test_g_idx_layer_packs_and_runs_like_its_dequantized_weight():
    scheme = Scheme(4, 32, False)
    k = 64
    x = _correlated_inputs(512, k, seed=0)
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(5))
    h = Hessian(k)
    h.add(x)
    qw, _, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=True))
    layer = QuantLinear(k, 16, False, scheme, has_g_idx=True)
    layer.load_qweight(qw)
    with exact_dense(layer):  # the packing under test, not the CPU kernel's bf16 inside
        torch.testing.assert_close(layer(x), x @ numerics.dequantize(qw, scheme).t(), rtol=1e-5, atol=1e-5)


def test_dead_inputs_get_zero_weights():
    scheme = Scheme(4, 32, False)
    x = _correlated_inputs(512, 64, seed=2)
    x[:, [3, 40]] = 0.0  # two inputs that are never active
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    h = Hessian(64)
    h.add(x)
    for act_order in (False, True):
        qw, loss, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=act_order))
        dq = numerics.dequantize(qw, scheme)
        assert torch.isfinite(dq).all() and torch.isfinite(torch.tensor(loss))
        assert dq[:, [3, 40]].abs().max() <= qw.scales.max() / 2 + 1e-6  # zero, up to where 0 falls on the grid


def test_cholesky_failure_is_recovered_by_growing_damping():
    h = torch.eye(6)
    h[0, 1] = h[1, 0] = 2.0  # indefinite: eigenvalues 3 and -1; needs damping > 1 x mean(diag) to factor
    u, damp = inverse_factor(h, 0.01)
    assert damp > 1.0 and torch.isfinite(u).all()
    w = torch.randn(4, 6)
    qw, _, used = gptq_quantize(w, h, Scheme(4, None, False), _gptq())
    assert used == damp and torch.isfinite(numerics.dequantize(qw, Scheme(4, None, False))).all()
    with pytest.raises(llmq.LlmqError, match="not positive definite"):
        inverse_factor(-torch.eye(3), 0.01)


@pytest.mark.parametrize("k", [40, 600])  # below and above the size where the symmetric split kicks in
def test_hessian_is_the_running_mean_of_2_xtx(k):
    batches = [torch.randn(b, 5, k, dtype=torch.float64) for b in (3, 1, 4)]
    h = Hessian(k)
    for x in batches:
        h.add(x.float())
    flat = torch.cat([x.reshape(-1, k) for x in batches])
    ref = 2 / flat.shape[0] * flat.t() @ flat
    assert h.n == flat.shape[0]
    torch.testing.assert_close(h.H.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_same_inputs_same_bits():
    scheme = Scheme(3, 32, False)
    x = _correlated_inputs(512, 96, seed=4)
    w = torch.randn(32, 96)
    h = Hessian(96)
    h.add(x)
    a, _, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=True, clip="mse", clip_grid=10))
    b, _, _ = gptq_quantize(w, h.H, scheme, _gptq(act_order=True, clip="mse", clip_grid=10))
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


# ------------------------------------------------------------------------------------------------ block walk


def _tiny(arch: str):
    from transformers import GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

    common = {"vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
    configs = {
        "llama": LlamaConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **common),
        "qwen2": Qwen2Config(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **common),
        "gpt_neox": GPTNeoXConfig(intermediate_size=128, num_hidden_layers=2, **common),
        "opt": OPTConfig(ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64, **common),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[arch]).eval()


@pytest.mark.parametrize(
    "arch, blocks, first_clusters",
    [
        ("llama", "model.layers", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]),
        ("qwen2", "model.layers", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]),
        ("gpt_neox", "gpt_neox.layers", [["attention.query_key_value"], ["attention.dense"]]),
        ("opt", "model.decoder.layers", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"]]),
    ],
)
def test_blocks_and_clusters_are_found_generically(arch, blocks, first_clusters):
    model = _tiny(arch)
    name, layers = structure.decoder_blocks(model)
    assert name == blocks and len(layers) == 2
    ids = torch.randint(0, 128, (4, 16))
    inputs = calibration.capture_inputs(model, layers[0], list(torch.split(ids, 2)), "cpu")
    clusters = calibration.linear_clusters(layers[0], inputs)
    assert clusters[:2] == first_clusters
    assert sum(len(c) for c in clusters) == sum(isinstance(m, torch.nn.Linear) for m in layers[0].modules())
    # the captured inputs reproduce the model's own hidden states after block 0
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    inputs.advance(layers[0])
    torch.testing.assert_close(torch.cat(inputs.hidden), states[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "opt"])
def test_gptq_in_memory_beats_rtn_on_the_calibration_text(arch):
    """Whole tiny models: GPTQ's logits on the calibration tokens are closer to full precision than RTN's."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _tiny(arch)(input_ids=ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        model = _tiny(arch)
        recipe = llmq.Recipe.from_dict(
            {"model": "x", "method": method, "scheme": {"bits": 3, "group_size": 32}, "eval": None,
             "calibration": {"batch_size": 4}, "ignore": ["lm_head", ".*embed_out"]}
        )
        llmq.quantize(model, recipe, calibration=ids)
        with torch.no_grad():
            errs[method] = (model(input_ids=ids).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs


def test_gptq_without_calibration_is_refused():
    recipe = llmq.Recipe.from_dict({"model": "x", "method": "gptq", "scheme": {"group_size": 32}, "eval": None})
    with pytest.raises(llmq.BadInputError, match="needs calibration"):
        llmq.quantize(_tiny("llama"), recipe)


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"act_order": True, "static_groups": True, "true_sequential": False}])
def test_llmq_run_gptq_reloads_with_the_in_memory_logits(tiny_recipe, tmp_path, options):
    """Disk streaming (llmq run) and the in-memory walk give the same model; from_pretrained loads it back."""
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text differs from the evaluation text. " * 60)
    tiny_recipe.update(
        method={"name": "gptq", **options},
        calibration={"data": str(calib), "n_samples": 6, "seqlen": 32, "batch_size": 4},
    )
    result = llmq.run(tiny_recipe)
    card = (result.output_dir / "README.md").read_text()
    assert "## Calibration\n\n6 windows x 32 tokens (192 tokens) of" in card and "act_order:" in card
    rows = result.report["layers"]
    assert len(rows) == 14 and all(r["method"] == "gptq" and r["damp"] >= 0.01 for r in rows)
    reloaded = llmq.load(result.output_dir)
    has_g_idx = options.get("act_order", False) and not options.get("static_groups", False)
    assert all((m.g_idx is not None) == has_g_idx for m in reloaded.modules() if isinstance(m, QuantLinear))

    recipe = llmq.Recipe.from_dict(tiny_recipe)
    model = AutoModelForCausalLM.from_pretrained(tiny_recipe["model"], dtype=torch.float32).eval()
    windows = calibration.calibration_batches(recipe.calibration, llmq.loading.load_tokenizer(tiny_recipe["model"]))
    llmq.quantize(model, recipe, calibration=windows)
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    assert result.metrics["quantized"]["ppl"] > 1
