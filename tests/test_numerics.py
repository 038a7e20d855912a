"""numerics.py against plain references, on fresh random inputs: every bit width, odd shapes, every grouping."""

from __future__ import annotations

import pytest
import torch

from llmq import numerics
from llmq.numerics import Scheme, dequantize, fake_quantize, minmax_qparams, mse_qparams, pack, quantize, unpack

BITS = numerics.SUPPORTED_BITS  # 2, 3, 4, 5, 6, 8
GROUPS = (None, 32, 64, 128)


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit reference of the GPTQ layout: code i of a column occupies stream bits [i*bits, (i+1)*bits)."""
    n, m = codes.shape
    words = torch.zeros(numerics.packed_len(n, bits), m, dtype=torch.int64)
    for i in range(n):
        for b in range(bits):
            pos = i * bits + b
            words[pos // 32] |= ((codes[i].long() >> b) & 1) << (pos % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 97])
def test_pack_matches_bitstream_reference_and_round_trips(bits, n):
    codes = torch.randint(0, 2**bits, (n, 5))
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (numerics.packed_len(n, bits), 5)
    assert torch.equal(packed, reference_pack(codes, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_extremes(bits):
    for value in (0, 2**bits - 1):
        codes = torch.full((64, 3), value)
        assert torch.equal(unpack(pack(codes, bits), bits, 64).long(), codes)


def test_pack_4bit_is_gptq_nibble_order():
    codes = torch.arange(8).reshape(8, 1)  # one word: 0x76543210
    assert pack(codes, 4).item() == 0x76543210


def test_pack_rejects_unsupported_bits():
    with pytest.raises(ValueError):
        pack(torch.zeros(32, 1, dtype=torch.long), 7)


def _per_column(t: torch.Tensor, scheme: Scheme, in_features: int) -> torch.Tensor:
    return t.repeat_interleave(scheme.group_size_for(in_features), dim=1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_at_most_half_a_step(bits, group, symmetric):
    out, inp = 37, 256
    scheme = Scheme(bits, group, symmetric)
    w = torch.randn(out, inp) * torch.rand(out, 1) * 3 + torch.randn(out, 1) * 0.1
    qw = quantize(w, scheme)
    assert qw.q.min() >= 0 and qw.q.max() <= scheme.maxq
    err = (dequantize(qw, scheme) - w).abs()
    half_step = _per_column(qw.scales, scheme, inp) / 2
    # exact bound s/2, up to the fp32 rounding of (q - z) * s, which is a few ulps of |w|
    fp32_slack = 8 * torch.finfo(torch.float32).eps * w.abs()
    assert torch.all(err <= half_step + fp32_slack)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_matches_plain_formula(bits, symmetric):
    scheme = Scheme(bits, 32, symmetric)
    w = torch.randn(9, 96, dtype=torch.float64)
    qw = quantize(w, scheme)
    zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, 2 ** (bits - 1))
    expected = torch.empty_like(w)
    for r in range(9):
        for c in range(96):
            g = c // 32
            expected[r, c] = (float(qw.q[r, c]) - float(zeros[r, g])) * float(qw.scales[r, g])
    torch.testing.assert_close(dequantize(qw, scheme, dtype=torch.float64), expected, rtol=1e-6, atol=1e-7)


def test_constant_and_zero_groups_are_exact():
    scheme = Scheme(4, 32, False)
    w = torch.zeros(2, 64)
    w[1, 32:] = 0.5
    torch.testing.assert_close(dequantize(quantize(w, scheme), scheme), w, rtol=0, atol=1e-7)


def test_g_idx_equals_contiguous_groups_when_default():
    scheme = Scheme(4, 32, False)
    w = torch.randn(8, 128)
    qw = quantize(w, scheme)
    g = numerics.default_g_idx(128, scheme)
    qg = quantize(w, scheme, qw.scales, qw.zeros, g_idx=g)
    assert torch.equal(qg.q, qw.q)
    assert torch.equal(dequantize(qg, scheme), dequantize(qw, scheme))


def test_g_idx_permuted_groups():
    """With act-order style g_idx, column j uses the qparams of group g_idx[j]."""
    scheme = Scheme(4, 32, False)
    w = torch.randn(4, 64)
    g_idx = torch.randperm(64) % 2
    scales, zeros = torch.rand(4, 2) + 0.1, torch.randint(0, 16, (4, 2), dtype=torch.int32)
    qw = quantize(w, scheme, scales, zeros, g_idx)
    d = dequantize(qw, scheme)
    for j in range(64):
        g = int(g_idx[j])
        ref = (torch.clamp(torch.round(w[:, j] / scales[:, g]) + zeros[:, g], 0, 15) - zeros[:, g]) * scales[:, g]
        torch.testing.assert_close(d[:, j], ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_forward_is_exact_and_gradient_is_straight_through(bits, symmetric):
    scheme = Scheme(bits, 64, symmetric)
    w = torch.randn(16, 128, requires_grad=True)
    fq = fake_quantize(w, scheme)
    assert torch.equal(fq.detach(), dequantize(quantize(w.detach(), scheme), scheme))
    g = torch.randn_like(fq)
    fq.backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 32, 64])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("norm", [2.0, 3.0])
def test_mse_search_never_worse_than_minmax(bits, group, symmetric, norm):
    scheme = Scheme(bits, group, symmetric)
    w = torch.randn(24, 128)
    w[0, 0] = 12.0  # an outlier, where clipping pays
    s0, z0 = minmax_qparams(w, scheme)
    s1, z1 = mse_qparams(w, scheme, grid=20, max_shrink=0.5, norm=norm, row_chunk=7)

    def group_err(s, z):
        d = dequantize(quantize(w, scheme, s, z), scheme) - w
        gs = scheme.group_size_for(128)
        return d.abs().pow(norm).reshape(24, 128 // gs, gs).sum(-1)

    e0, e1 = group_err(s0, z0), group_err(s1, z1)
    assert torch.all(e1 <= e0 * (1 + 1e-6) + 1e-9)
    if bits <= 4:
        assert e1.sum() < e0.sum()  # on Gaussian weights with an outlier, clipping strictly helps at low bits


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (33, 64), (100, 128)])
def test_pack_qweight_round_trip(bits, symmetric, shape):
    scheme = Scheme(bits, 32, symmetric)
    w = torch.randn(*shape)
    qw = quantize(w, scheme)
    tensors = numerics.pack_qweight(qw, scheme, torch.float32)
    out, inp = shape
    assert tensors["qweight"].shape == (numerics.packed_len(inp, bits), out)
    assert tensors["scales"].shape == (inp // 32, out)
    assert tensors["qzeros"].shape == (inp // 32, numerics.packed_len(out, bits))
    back = numerics.unpack_qweight(tensors["qweight"], tensors["scales"], tensors["qzeros"], None, scheme, inp)
    assert torch.equal(back.q, qw.q)
    assert torch.equal(dequantize(back, scheme), dequantize(qw, scheme))


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_column_weights(symmetric):
    """Unit column weights change nothing; a weighted search never loses on its own (weighted) objective."""
    scheme = Scheme(3, 32, symmetric)
    w = torch.randn(16, 64)
    w[:, 5] *= 6  # an outlier column
    plain = mse_qparams(w, scheme, grid=20, max_shrink=0.5)
    ones = mse_qparams(w, scheme, grid=20, max_shrink=0.5, col_weights=torch.ones(64))
    assert torch.equal(plain[0], ones[0]) and (plain[1] is None or torch.equal(plain[1], ones[1]))
    c = torch.rand(64) * 10
    weighted = mse_qparams(w, scheme, grid=20, max_shrink=0.5, col_weights=c)

    def objective(s, z):
        d = (dequantize(quantize(w, scheme, s, z), scheme) - w).pow(2) * c
        return d.reshape(16, 2, 32).sum(-1)

    assert torch.all(objective(*weighted) <= objective(*plain) * (1 + 1e-6) + 1e-9)
