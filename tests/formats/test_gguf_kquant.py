"""llama.cpp's K-quants (Q6_K / Q5_K / Q4_K / Q3_K / Q2_K): llmq's symmetric codes with scales on the K-quant grid
(`method.gguf_grid`, numerics.kquant_scales) exported exactly (gguf_export.encode_kquant), checked against gguf's
own dequantizers, transformers' GGUF loader and llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from test_gguf import IDS, _llama_logits, _llmq_logits, _transformers_logits

import llmq
from llmq import numerics
from llmq.errors import BadInputError
from llmq.formats.gguf_export import encode_kquant, export_gguf
from llmq.numerics import Scheme

gguf = pytest.importorskip("gguf")

K_SCHEMES = [(6, 16), (6, 32), (5, 32), (5, 64), (4, 32), (4, 64), (4, 256), (3, 16), (3, 32), (3, 128), (2, 16), (2, 64)]


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Fresh random weights with rows of different sizes, an outlier and one all-zero group (a dead input group)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, 1, generator=gen) * 0.05 + 0.001)
    w[1, 5] = 0.4
    w[0, :16] = 0
    return w


@pytest.mark.parametrize("bits, group", K_SCHEMES)
def test_kquant_scales_lie_on_the_grid_and_quantize_no_worse_than_minmax(bits, group):
    """Every super-block's scales are k·d with d an fp16 value and k in 1..k_max, exactly in fp32; choosing k by the
    group's error keeps the squared error at or below plain min-max's (tolerance 2%) on fresh random weights."""
    scheme = Scheme(bits=bits, group_size=group, symmetric=True)
    w = _weight(7, 768, seed=bits * 1000 + group)
    scales, _ = numerics.minmax_qparams(w, scheme)
    on_grid = numerics.kquant_scales(w, scales, scheme)
    d, k = numerics.kquant_factors(on_grid, scheme)
    _, _, k_max = numerics.KQUANTS[bits]
    assert d.dtype == torch.float16 and bool((d > 0).all()) and int(k.min()) >= 1 and int(k.max()) <= k_max
    assert torch.equal((k.float() * d.float().unsqueeze(-1)).reshape(on_grid.shape), on_grid)
    err = {name: (numerics.dequantize(numerics.quantize(w, scheme, s), scheme) - w).pow(2).sum()
           for name, s in (("minmax", scales), ("grid", on_grid))}
    assert err["grid"] <= 1.02 * err["minmax"]
    assert numerics.kquant_factors(scales, scheme) is None  # min-max scales are not on the grid


@pytest.mark.parametrize("scheme, cols", [(Scheme(4, 32, False), 512), (Scheme(4, 32, True), 576), (Scheme(4, 48, True), 768),
                                          (Scheme(3, 8, True), 512), (Scheme(8, 32, True), 512), (Scheme(4, None, True), 512),
                                          (Scheme(4, 64, True, "nf4"), 512), (Scheme(5, 16, True), 512),
                                          (Scheme(6, 8, True), 512)])
def test_what_has_no_kquant_type(scheme, cols):
    """Asymmetric, widths not a multiple of 256, groups that do not divide 256 or split a sub-block, 8 bits,
    per-channel and codebooks: no K-quant (gguf_grid gives those fp16 scales instead)."""
    assert numerics.kquant_type(scheme, cols) is None
    w = _weight(4, cols, seed=1)
    scales = numerics.gguf_grid_scales(w, numerics.minmax_qparams(w, scheme)[0], scheme)
    assert torch.equal(scales, scales.half().float())


@pytest.mark.parametrize("bits, group", K_SCHEMES)
def test_kquant_blocks_dequantize_with_ggufs_own_code_to_llmqs_weights(bits, group):
    """Bit for bit: gguf's Q6_K / Q5_K / Q4_K / Q3_K / Q2_K dequantizers read encode_kquant's bytes as llmq's dequantized weights."""
    scheme = Scheme(bits=bits, group_size=group, symmetric=True)
    w = _weight(5, 768, seed=bits + group)
    qw = numerics.quantize(w, scheme, numerics.kquant_scales(w, numerics.minmax_qparams(w, scheme)[0], scheme))
    kind = numerics.kquant_type(scheme, 768)
    data = encode_kquant(qw, scheme, kind)
    assert data.shape == (5, 3 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1])
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    assert np.array_equal(back, numerics.dequantize(qw, scheme).numpy())


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A tiny Llama whose widths are multiples of 256 (hidden 256, intermediate 512), so every layer can be K."""
    folder = tmp_path_factory.mktemp("wide-llama")
    make_tiny_llama(folder, hidden=256, intermediate=512)
    return folder


@pytest.fixture(scope="module")
def mixed_llama(tmp_path_factory) -> Path:
    """Intermediate 320: down_proj's 320 inputs are not super-blocks of 256, the other layers' 256 are."""
    folder = tmp_path_factory.mktemp("mixed-llama")
    make_tiny_llama(folder, hidden=256, intermediate=320)
    return folder


def _on_grid(model: Path, out: Path, bits: int, group: int, method: str = "rtn") -> Path:
    m = {"name": method, "gguf_grid": True}
    if method == "gptq":
        m |= {"static_groups": True, "act_order": True}
    llmq.run({"model": str(model), "method": m, "scheme": {"bits": bits, "group_size": group, "symmetric": True},
              "calibration": {"data": "lambada", "n_samples": 4, "seqlen": 64}, "eval": None,
              "output": {"dir": str(out), "dtype": "float32"}})
    return out


@pytest.mark.parametrize("bits, group, method, kind", [(6, 16, "gptq", "Q6_K"), (5, 32, "rtn", "Q5_K"),
                                                       (4, 32, "rtn", "Q4_K"), (3, 16, "gptq", "Q3_K"),
                                                       (2, 16, "rtn", "Q2_K"), (4, 64, "gptq", "Q4_K")])
def test_gguf_grid_recipe_exports_exactly_as_kquants(wide_llama, tmp_path, bits, group, method, kind):
    """RTN and GPTQ with gguf_grid: every layer goes to its K-quant, and transformers' GGUF loader (gguf's
    dequantizers, llama.cpp's row order undone) gives llmq's exact logits, bit for bit."""
    ckpt = _on_grid(wide_llama, tmp_path / "q", bits, group, method)
    done = export_gguf(ckpt, tmp_path / "m.gguf", embeddings="f32")
    assert done.types == {kind: 14, "F32": 6} and not done.notes[1:]  # the one note: the tokenizer's pre rule
    assert torch.equal(_transformers_logits(tmp_path / "m.gguf"), _llmq_logits(ckpt))


def test_layers_the_grid_cannot_hold_get_fp16_scales_and_q4_0(mixed_llama, tmp_path):
    """down_proj (320 inputs) keeps fp16 scales and exports as Q4_0, exactly; the rest is Q4_K."""
    ckpt = _on_grid(mixed_llama, tmp_path / "q", 4, 32)
    done = export_gguf(ckpt, tmp_path / "m.gguf", embeddings="f32")
    assert done.types == {"Q4_K": 12, "Q4_0": 2, "F32": 6} and not done.notes[1:]
    assert torch.equal(_transformers_logits(tmp_path / "m.gguf"), _llmq_logits(ckpt))


def test_gguf_grid_refusals(wide_llama, tmp_path):
    """Checked before any work, naming the key: GPTQ without static groups, QAT, and a dtype that cannot hold
    K-quant scales."""
    base = {"model": str(wide_llama), "scheme": {"bits": 4, "group_size": 32, "symmetric": True}, "eval": None,
            "output": {"dir": str(tmp_path / "never")}}
    with pytest.raises(BadInputError, match="static_groups: true"):
        llmq.validate({**base, "method": {"name": "gptq", "gguf_grid": True}})
    with pytest.raises(BadInputError, match="methods rtn and gptq"):
        llmq.validate({**base, "method": {"name": "qat", "gguf_grid": True}})
    with pytest.raises(BadInputError, match="output.dtype.*float32"):
        llmq.validate({**base, "method": {"name": "rtn", "gguf_grid": True}, "output": {"dir": str(tmp_path / "n"), "dtype": "float16"}})
    with pytest.raises(BadInputError, match="output.dtype.*float32 or float16"):  # no K layer, but bf16 scales
        llmq.validate({**base, "scheme": {"bits": 4, "group_size": 32, "symmetric": False},
                       "method": {"name": "rtn", "gguf_grid": True}, "output": {"dir": str(tmp_path / "n"), "dtype": "bfloat16"}})
    assert not (tmp_path / "never").exists() and not (tmp_path / "n").exists()


@pytest.mark.parametrize("bits, group", [(6, 16), (5, 32), (4, 32), (3, 16), (2, 16)], ids=["q6_k", "q5_k", "q4_k", "q3_k", "q2_k"])
def test_llama_cpp_runs_kquant_exports_with_llmqs_logits(wide_llama, tmp_path, bits, group):
    """The oracle: llama.cpp loads each K-quant export and its logits match llmq's exact ones. Its CPU kernels round
    activations to 8 bits (q8_K) for these types: within 2% of the largest logit, the same argmax almost everywhere."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt = _on_grid(wide_llama, tmp_path / "q", bits, group)
    export_gguf(ckpt, tmp_path / "m.gguf", embeddings="f32")
    theirs, ours = _llama_logits(llama_cpp, tmp_path / "m.gguf"), _llmq_logits(ckpt)[0]
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("bits, kind", [(5, "Q5_0"), (6, "Q8_0")])
def test_five_and_six_bit_checkpoints_run_export_to_gguf_and_not_to_peer_formats(wide_llama, tmp_path, bits, kind):
    """5- and 6-bit symmetric layers (llama.cpp's Q5_0 / Q6_K precisions): the checkpoint runs on the default CPU
    kernel (torch's CPU ops take 4 and 8 bits: the reference kernel) with its exact dense logits; with fp16 scales
    the GGUF export is exact (Q5_0; 6-bit codes in Q8_0's int8); GPTQ and compressed-tensors loaders read 2/3/4/8
    bits, so those exports are refused before anything is written."""
    from llmq.formats import export_checkpoint

    ckpt = tmp_path / "q"
    llmq.run({"model": str(wide_llama), "method": "rtn", "scheme": {"bits": bits, "group_size": 32, "symmetric": True},
              "eval": None, "output": {"dir": str(ckpt), "dtype": "float16"}})
    ours = _llmq_logits(ckpt)  # exact: dequantized once, fp32
    with torch.no_grad():
        assert (llmq.load(ckpt, dtype=torch.float32)(IDS).logits - ours).abs().max() <= 1e-4 * ours.abs().max()
    done = export_gguf(ckpt, tmp_path / "m.gguf", embeddings="f32")
    assert done.types == {kind: 14, "F32": 6} and not done.notes[1:]
    assert torch.equal(_transformers_logits(tmp_path / "m.gguf"), ours)
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(BadInputError, match=f"{bits}-bit; {fmt} loaders read 2, 3, 4, 8-bit"):
            export_checkpoint(ckpt, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
