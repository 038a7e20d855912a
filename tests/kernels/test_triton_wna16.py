"""Triton WnA16 kernels (llmq/kernels/triton_wna16.py) against the torch reference, on fresh random layers.

Without a GPU the kernels run under the Triton interpreter on CPU (numpy, one program at a time), so shapes are
small; on a CUDA machine the same tests run the compiled kernels (and autotuning) on the GPU.

Two kinds of data:
- "dyadic" layers and inputs (power-of-two scales, small integer activations, zero points and biases on a 1/4
  grid) make every product and every fp32 partial sum exact, so the kernel must equal the reference rounded once
  to the activation dtype, bit for bit, whatever the summation order. Any unpacking, group or zero-point slip
  shows up as a mismatch; these tests cover the bits x grouping x symmetry cross product, act order and split-K.
- Gaussian inputs and scales check the real rounding behaviour against an fp32 reference with the tolerance of
  `assert_close_to_reference`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

# Before triton or the kernel module is imported: triton.jit decides at decoration time whether to interpret.
_INTERPRET_WAS = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from llmq import numerics
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.kernels import torch_ref
from llmq.numerics import QWeight, Scheme


def _load_private_copy(name: str):
    """A fresh copy of the kernel module, not registered in sys.modules (the package keeps its own)."""
    spec = importlib.util.spec_from_file_location(f"llmq.kernels.{name}", importlib.util.find_spec(
        "llmq.kernels.triton_wna16").origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tw = importlib.import_module("llmq.kernels.triton_wna16")
if not torch.cuda.is_available() and not tw.INTERPRET:
    # Another test module imported llmq first, so the package's copy was decorated for compilation: test a
    # private copy decorated for the interpreter instead, and leave the package's module as it is.
    tw = _load_private_copy("_triton_wna16_interpreted")
# The kernels are decorated now. Triton still reads the flag while running interpreted kernels, so the fixture
# below switches it on around each test here; elsewhere in the session it is left as it was.
if _INTERPRET_WAS is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_WAS


@pytest.fixture(autouse=True)
def _interpreter_flag(monkeypatch):
    if tw.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = (2, 3, 4, 8)
# K per grouping: a multiple of the group size, and not a multiple of 128 where possible, so the last K tile is
# partial; per-channel K = 200 also leaves the last packed word partly padding for 2 and 3 bits.
K_FOR_GROUP = {32: 224, 64: 192, 128: 384, None: 200}


def make_layer(k: int, n: int, scheme: Scheme, *, seed: int, dtype=torch.float16, bias: bool = True,
               act_order: bool = False, dyadic: bool = False) -> QuantLinear:
    """A QuantLinear with uniformly random codes, random per-group scales and zero points (both ends of the
    range present when asymmetric), an act-order g_idx if asked, packed by llmq itself (load_qweight)."""
    gen = torch.Generator().manual_seed(seed)
    groups = scheme.n_groups(k)
    q = torch.randint(0, scheme.maxq + 1, (n, k), generator=gen).to(torch.uint8)
    if dyadic:
        scales = torch.pow(2.0, -torch.randint(3, 8, (n, groups), generator=gen).float())
    else:
        scales = (torch.rand(n, groups, generator=gen) + 0.5) * (0.08 / scheme.maxq)
    zeros = None
    if not scheme.symmetric:
        zeros = torch.randint(0, scheme.maxq + 1, (n, groups), generator=gen).to(torch.int32)
        zeros[0, 0], zeros[-1, -1] = 0, scheme.maxq
    g_idx = None
    if act_order:  # as GPTQ act_order writes it: columns quantized in the order perm, groups along that order
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // scheme.group_size_for(k)).to(torch.int32)
    layer = QuantLinear(k, n, bias, scheme, dtype, has_g_idx=act_order)
    layer.load_qweight(QWeight(q, scales, zeros, g_idx))
    if bias:
        b = torch.randint(-8, 9, (n,), generator=gen) / 4 if dyadic else torch.randn(n, generator=gen)
        layer.bias.data.copy_(b.to(dtype))
    return layer.to(DEVICE)


def make_input(shape: tuple[int, ...], dtype, *, seed: int, dyadic: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, shape, generator=gen).float() if dyadic else torch.randn(shape, generator=gen)
    return x.to(dtype).to(DEVICE)


def reference(x: torch.Tensor, layer) -> torch.Tensor:
    """torch_ref.linear in fp32 on the same (already dtype-rounded) inputs."""
    return torch_ref.linear(x.float(), layer)


def assert_exact(y: torch.Tensor, x: torch.Tensor, layer) -> None:
    """Dyadic data: every product and partial sum is exact in fp32 (|sum| < 2^24 units of the smallest scale),
    so y must be the exact result rounded once to x.dtype, as the reference rounded to x.dtype is."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    ref = reference(x, layer).to(x.dtype)
    bad = (y != ref).sum().item()
    assert bad == 0, f"{bad} of {y.numel()} outputs differ; max |diff| {(y.float() - ref.float()).abs().max().item()}"


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, layer) -> None:
    """|y - ref| <= (2 eps + K 2^-24) (|x| @ |W|^T + |b|) + 1e-6, elementwise.

    Why: the kernel rounds each dequantized weight to the activation dtype once (relative error <= eps/2; none
    for fp16 with fp16 scales, where the reference rounds the same way), accumulates in fp32 in its own order
    (<= K 2^-24 of the sum of |terms|) and rounds the output once (<= eps/2 of |y| <= the same sum plus |b|).
    That is eps + K 2^-24 relative to |x| @ |W|^T + |b|; the bound allows twice the rounding part.
    """
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    ref = reference(x, layer)
    w = torch_ref.dequantized_weight(layer).float()
    size = x.float().abs() @ w.abs().t()
    if layer.bias is not None:
        size = size + layer.bias.float().abs()
    eps = torch.finfo(x.dtype).eps
    tol = (2 * eps + layer.in_features * 2.0**-24) * size + 1e-6
    err = (y.float() - ref).abs()
    assert (err <= tol).all(), f"max err/tol {(err / tol).max().item():.3g} ({x.dtype}, max err {err.max().item():.3g})"


# ------------------------------------------------------------------------------------- exact unpacking


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, None], ids=["g32", "g64", "g128", "perchannel"])
@pytest.mark.parametrize("bits", BITS)
def test_every_bit_width_and_grouping_is_exact(bits, group_size, symmetric):
    """Both paths (GEMV M=1, decode tile M=3, GEMM M=17) on one layer. N=72 fits one column block; N=160 and 200
    need two with the second partial; at 3 bits N=160 packs its zero points into whole 3-word runs, 72 and 200 end
    in a partial run."""
    k, n = K_FOR_GROUP[group_size], {32: 72, 64: 200, 128: 160, None: 200}[group_size]
    seed = 1000 * bits + (group_size or 0) + symmetric
    layer = make_layer(k, n, Scheme(bits, group_size, symmetric), seed=seed, bias=bits != 8, dyadic=True)
    for m in (1, 3, 17):
        x = make_input((m, k), torch.float16, seed=seed + m, dyadic=True)
        assert_exact(tw.linear(x, layer), x, layer)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, None], ids=["g32", "g128", "perchannel"])
def test_act_order_g_idx_is_exact(bits, group_size):
    """g_idx from a random permutation (GPTQ act_order): every row gathers its own group's scale and zero point.
    Per-channel with g_idx (all zeros) takes the one-group path."""
    k = K_FOR_GROUP[group_size]
    dtype = torch.bfloat16 if bits in (3, 8) else torch.float16
    layer = make_layer(k, 136, Scheme(bits, group_size, bits == 8), seed=7 * bits, dtype=dtype, act_order=True,
                       dyadic=True)
    assert layer.g_idx is not None
    for m in (1, 5, 33):
        x = make_input((m, k), dtype, seed=m, dyadic=True)
        assert_exact(tw.linear(x, layer), x, layer)


@pytest.mark.parametrize("bits", [3, 4])
def test_group_size_that_does_not_tile_is_exact(bits):
    """Group size 96 neither divides nor is divided by the K tile: the per-row gather path without g_idx."""
    layer = make_layer(288, 72, Scheme(bits, 96, False), seed=bits, dyadic=True)
    for m in (2, 20):
        x = make_input((m, 288), torch.float16, seed=m, dyadic=True)
        assert_exact(tw.linear(x, layer), x, layer)


@pytest.mark.parametrize("split_k", [1, 2, 3, 5])
def test_split_k_decode_is_exact(split_k):
    """K = 640 is 5 tiles of 128: 2 and 3 splits get uneven runs of tiles, 5 one each; the fp32 partial sums are
    reduced on the host. With dyadic data every split count gives the same bits."""
    layer = make_layer(640, 200, Scheme(3, 64, False), seed=split_k, bias=True, dyadic=True)
    for m in (1, 4):
        x = make_input((m, 640), torch.bfloat16, seed=m, dyadic=True)
        assert_exact(tw.decode_linear(x, layer, split_k=split_k), x, layer)


def test_more_splits_than_k_tiles_store_zeros():
    """Splits past the last K tile own no tile and contribute zeros."""
    layer = make_layer(192, 72, Scheme(4, 64, True), seed=3, dyadic=True)
    x = make_input((3, 192), torch.float16, seed=3, dyadic=True)
    assert_exact(tw.decode_linear(x, layer, split_k=7), x, layer)


# GPU configs run under the interpreter: other tile shapes take other branches (one group row per tile, several
# whole groups per tile, a K tile of 32 at 3 bits), which the fixed interpreter config alone would not reach.
_SMALL_CONFIGS = [
    ({"BLOCK_N": 64, "BLOCK_K": 32}, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}),
    ({"BLOCK_N": 256, "BLOCK_K": 64}, {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}),
    ({"BLOCK_N": 64, "BLOCK_K": 256}, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 1}),
]


@pytest.mark.skipif(not tw.INTERPRET, reason="block sizes are autotuned on a GPU")
@pytest.mark.parametrize("configs", _SMALL_CONFIGS, ids=["k32", "k64", "k256"])
@pytest.mark.parametrize("bits", BITS)
def test_other_block_sizes_are_exact(bits, configs, monkeypatch):
    decode_cfg, gemm_cfg = configs
    monkeypatch.setattr(tw, "_DECODE_INTERPRET", decode_cfg)
    monkeypatch.setattr(tw, "_GEMM_INTERPRET", gemm_cfg)
    for group_size, act_order in ((64, False), (128, True)):
        layer = make_layer(256, 136, Scheme(bits, group_size, False), seed=bits, act_order=act_order, dyadic=True)
        for m in (1, 3, 40):
            x = make_input((m, 256), torch.float16, seed=m, dyadic=True)
            assert_exact(tw.linear(x, layer), x, layer)


# ------------------------------------------------------------------------------ rounding on real-valued data


@pytest.mark.parametrize("m", [1, 3, 16, 17, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_matches_reference_within_rounding(dtype, m):
    """Gaussian activations, real-valued scales: M <= 16 takes the decode path, M > 16 the GEMM."""
    bits, group_size = {1: (4, 128), 3: (3, 64), 16: (2, 32), 17: (8, None), 33: (4, 32)}[m]
    k = K_FOR_GROUP[group_size]
    layer = make_layer(k, 200, Scheme(bits, group_size, m % 2 == 0), seed=m, dtype=dtype, bias=m != 16)
    x = make_input((m, k), dtype, seed=100 + m)
    assert_close_to_reference(tw.linear(x, layer), x, layer)


@pytest.mark.parametrize("act_order", [False, True], ids=["", "act_order"])
def test_fp32_activations_and_scales(act_order):
    """fp32 activations multiply in full fp32 (no tf32), scales stored in fp32."""
    layer = make_layer(320, 72, Scheme(4, 64, False), seed=5, dtype=torch.float32, act_order=act_order)
    for m in (1, 4, 24):
        x = make_input((m, 320), torch.float32, seed=m)
        assert_close_to_reference(tw.linear(x, layer), x, layer)


def test_bf16_activations_with_fp16_scales():
    """Mixed: the weight is dequantized in fp32 and rounded once, to bf16."""
    layer = make_layer(384, 200, Scheme(4, 128, False), seed=9, dtype=torch.float16)
    for m in (1, 7, 19):
        x = make_input((m, 384), torch.bfloat16, seed=m)
        assert_close_to_reference(tw.linear(x, layer), x, layer)


@pytest.mark.parametrize("shape", [(2, 9, 192), (3, 1, 192), (2, 2, 4, 192)])
def test_batched_inputs_keep_their_leading_dims(shape):
    """[B, T, K] inputs: 18 rows take the GEMM, 3 and 16 the decode path; a non-contiguous view works too."""
    layer = make_layer(192, 72, Scheme(4, 64, False), seed=len(shape), dtype=torch.bfloat16)
    x = make_input(shape, torch.bfloat16, seed=shape[0])
    y = tw.linear(x, layer)
    assert y.shape == (*shape[:-1], 72)
    assert_close_to_reference(y, x, layer)
    xt = make_input((shape[-1], *shape[:-1]), torch.bfloat16, seed=1).movedim(0, -1)  # strided along K
    assert_close_to_reference(tw.linear(xt, layer), xt, layer)


def test_decode_path_accepts_more_than_16_rows():
    """decode_linear runs any M 16 rows at a time (linear itself sends such inputs to the GEMM)."""
    layer = make_layer(192, 72, Scheme(2, 64, True), seed=4, dyadic=True)
    x = make_input((37, 192), torch.float16, seed=4, dyadic=True)
    assert_exact(tw.decode_linear(x, layer), x, layer)
    assert_exact(tw.gemm_linear(x[:5], layer), x[:5], layer)


def test_empty_and_wrong_inputs():
    layer = make_layer(192, 72, Scheme(4, 64, False), seed=0)
    assert tw.linear(torch.zeros(0, 192, dtype=torch.float16, device=DEVICE), layer).shape == (0, 72)
    assert tw.linear(torch.zeros(2, 0, 192, dtype=torch.float16, device=DEVICE), layer).shape == (2, 0, 72)
    with pytest.raises(ValueError, match="192"):
        tw.linear(torch.zeros(1, 128, dtype=torch.float16, device=DEVICE), layer)
    with pytest.raises(TypeError):
        tw.linear(torch.zeros(1, 192, dtype=torch.int32, device=DEVICE), layer)


# ---------------------------------------------------------------------------------------------- selection


def test_supported():
    for bits in BITS:
        assert tw.supported(Scheme(bits, 128), torch.device("cuda"))
        assert tw.supported(Scheme(bits, None, True), "cuda:0")
        assert tw.supported(Scheme(bits, 128), "cpu") == tw.INTERPRET
    assert not tw.supported(Scheme(4, 64, format="nf4"), "cuda")
    assert not tw.supported(Scheme(5, 64), "cuda")


def test_module_imports_without_triton(monkeypatch):
    """A CPU-only install has no triton: the module must import and say it supports nothing."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = _load_private_copy("_triton_wna16_without_triton")
    assert module.triton is None
    assert not module.supported(Scheme(4, 128), "cuda")


def test_numerics_layout_assumption():
    """The kernels read codes as a little-endian bit stream of int32 words (numerics.pack): code i of a column
    at bits [i*bits, (i+1)*bits). Pin the 3-bit straddle the kernels special-case: code 10 = bits 30..32."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b111
    words = numerics.pack(codes, 3)
    assert words[0, 0].item() == -(2**31) + 2**30 and words[1, 0].item() == 1
