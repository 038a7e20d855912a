"""THE quantization math of llmq: what an n-bit integer weight means, in one place.

RTN, GPTQ, QAT and every kernel call these functions, so they all agree on one definition:

    w ≈ (q - z) * s        q, z integers in [0, 2**bits - 1], s a float scale, per output row and per input group

- Asymmetric (min-max): s = (max(w, 0) - min(w, 0)) / (2**bits - 1), z = round(-min(w, 0) / s).
- Symmetric: z is fixed at 2**(bits-1) and s = 2 * absmax / (2**bits - 1), the GPTQ convention: every element,
  including ±absmax, rounds to within s/2 and all 2**bits levels are used.
- Codebook formats (`format: nf4 | fp4`, bitsandbytes' 4-bit data types): w ≈ level[q] * s, where level is a
  fixed table of 16 values in [-1, 1] and s the absmax of the group (bitsandbytes calls groups "blocks"); q is
  the index of the nearest level. No zero point.
- llama.cpp's K-quant grid (`kquant_*`, `gguf_grid_scales`): scales of 256 inputs of a row restricted to integer
  multiples k·d of one fp16 d, so a symmetric scheme's weights are exactly a Q6_K / Q5_K / Q4_K / Q3_K / Q2_K block.
- Groups run along the input dimension: column j belongs to group j // group_size (or g_idx[j] when given);
  `group_size=None` means one group per output row (per-channel).

Packing follows the GPTQ layout (see README, FORMAT): codes are a little-endian bit stream along the packed
dimension, split into int32 words, so value i sits at bits [i*bits, (i+1)*bits) — for 2, 4 and 8 bits that is
the usual "32/bits values per word, low bits first"; for 3 bits values straddle word boundaries exactly as in
GPTQ's 3-bit format.

This module deliberately knows nothing about nn.Modules, files or models: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# What GPTQ / compressed-tensors loaders (GPTQModel, vLLM, transformers) read: 5 and 6 bits are llmq's and GGUF's only.
PEER_BITS = (2, 3, 4, 8)

# bitsandbytes' 4-bit data types, indexed by code: NF4 (QLoRA, Dettmers et al. 2023: quantiles of a normal
# distribution, normalized to [-1, 1]) and its FP4 (e2m1 values normalized to [-1, 1]). tests/test_bitsandbytes.py
# checks these against bitsandbytes' own tables.
CODEBOOKS: dict[str, tuple[float, ...]] = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    "fp4": (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
            -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
            -0.1666666716337204, -0.25),
}


@dataclass(frozen=True)
class Scheme:
    """What a weight becomes on disk."""

    bits: int = 4
    group_size: int | None = 128  # None = one group per output channel
    symmetric: bool = False
    format: Literal["int", "nf4", "fp4", "int8"] = "int"  # int8: bitsandbytes' LLM.int8 (its own quantization only)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def codebook(self) -> tuple[float, ...] | None:
        """The levels of a codebook format (nf4, fp4), or None for the integer grid."""
        return CODEBOOKS.get(self.format)

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def fits(self, in_features: int) -> bool:
        """Whether a layer of `in_features` inputs splits into whole groups of this scheme (per-channel always does)."""
        return self.group_size is None or in_features % self.group_size == 0


class QWeight(NamedTuple):
    """Unpacked, exact quantized weight: what every method returns."""

    q: Tensor  # integer codes [out, in] (uint8 / int32), values in [0, maxq]
    scales: Tensor  # [out, n_groups] float
    zeros: Tensor | None  # [out, n_groups] integer zero points; None = symmetric (implicit 2**(bits-1))
    g_idx: Tensor | None = None  # [in] group of each input column; None = column j in group j // group_size


def default_g_idx(in_features: int, scheme: Scheme, device=None) -> Tensor:
    gs = scheme.group_size_for(in_features)
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs


def _per_group(w: Tensor, scheme: Scheme) -> Tensor:
    """View [out, in] as [out, n_groups, group_size] (contiguous groups, no g_idx)."""
    out, inp = w.shape
    gs = scheme.group_size_for(inp)
    if inp % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {inp}")
    return w.reshape(out, inp // gs, gs)


def minmax_qparams(w: Tensor, scheme: Scheme, shrink: float | Tensor = 1.0) -> tuple[Tensor, Tensor | None]:
    """Min-max scales and zero points per (row, group) of w [out, in]; `shrink` < 1 clips the range.

    Returns (scales [out, n_groups] fp32, zeros [out, n_groups] int32 or None when symmetric).
    """
    return _range_qparams(_group_range(_per_group(w.float(), scheme), scheme), scheme, shrink)


def _group_range(wg: Tensor, scheme: Scheme) -> tuple[Tensor, Tensor]:
    """(low, high) of each group of wg [out, G, gs]: (-, absmax) when symmetric or a codebook, else (min(w, 0), max(w, 0))."""
    if scheme.symmetric or scheme.codebook is not None:
        return wg.abs().amax(dim=-1), wg.abs().amax(dim=-1)
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def _range_qparams(rng: tuple[Tensor, Tensor], scheme: Scheme, shrink: float | Tensor) -> tuple[Tensor, Tensor | None]:
    low, high = rng
    if scheme.codebook is not None:  # levels span [-1, 1]: the scale is the (clipped) absmax
        scales = high * shrink
        return torch.where(scales > 0, scales, torch.ones_like(scales)), None
    if scheme.symmetric:
        scales = 2 * (high * shrink) / scheme.maxq
        return torch.where(scales > 0, scales, torch.ones_like(scales)), None
    xmin, xmax = low * shrink, high * shrink
    scales = (xmax - xmin) / scheme.maxq
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-xmin / scales).clamp(0, scheme.maxq).to(torch.int32)
    return scales, zeros


def _expand(t: Tensor, g_idx: Tensor | None, in_features: int, scheme: Scheme) -> Tensor:
    """Per-group [out, n_groups] → per-column [out, in]."""
    if g_idx is None:
        return t.repeat_interleave(scheme.group_size_for(in_features), dim=1)
    return t[:, g_idx.long()]


def stored_scales(scales: Tensor, dtype: torch.dtype, straight_through: bool = False) -> Tensor:
    """Scales as they will be read back from `dtype` (what is stored is what the codes must fit), in fp32; a tiny
    scale never rounds to zero in fp16 / bf16. `straight_through`: the gradient skips the rounding to `dtype` and
    stays fp32 (autograd's cast would round it to fp16, where small gradients underflow)."""
    rounded = _CastSTE.apply(scales, dtype) if straight_through else scales.to(dtype).float()
    return rounded.clamp_min(torch.finfo(dtype).tiny)


class _CastSTE(torch.autograd.Function):
    """x rounded to `dtype` and back to fp32; the gradient passes unchanged, in fp32."""

    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).float()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def zero_values(zeros: Tensor | None, scales: Tensor, scheme: Scheme) -> Tensor:
    """Zero points as floats shaped like `scales`: the stored ones, or 2**(bits-1) for symmetric schemes."""
    if zeros is None:
        return torch.full_like(scales, float(1 << (scheme.bits - 1)))
    return zeros.float()


def round_to_grid(w: Tensor, s: Tensor, z: Tensor, maxq: int, rounding=torch.round) -> Tensor:
    """The codes clamp(round(w / s) + z, 0, maxq) as floats; s and z broadcast against w. `rounding` is
    torch.round, or `round_ste` where gradients must flow (learnable qparams in QAT): the same values."""
    return torch.clamp(rounding(w / s) + z, 0, maxq)


def from_grid(q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """Codes back to values: (q - z) * s."""
    return (q - z) * s


def nearest_level(x: Tensor, levels: tuple[float, ...]) -> Tensor:
    """Index (as float, like round_to_grid's codes) of the level nearest to each element of x; the first listed
    of equal levels (fp4's +0 and -0)."""
    table = torch.tensor(levels, dtype=torch.float32, device=x.device)
    order = torch.argsort(table, stable=True)
    ranked = table[order]
    keep = torch.ones_like(ranked, dtype=torch.bool)
    keep[1:] = ranked[1:] != ranked[:-1]
    ranked, order = ranked[keep], order[keep]
    mids = (ranked[1:] + ranked[:-1]) / 2
    return order[torch.bucketize(x.float().contiguous(), mids)].to(torch.float32)


def to_codes(w: Tensor, s: Tensor, z: Tensor, scheme: Scheme) -> Tensor:
    """The codes of w under scales s and zero points z (broadcast against w), as floats: the integer grid's
    clamp(round(w / s) + z), or a codebook's nearest level to w / s (z unused)."""
    if scheme.codebook is not None:
        return nearest_level(w / s, scheme.codebook)
    return round_to_grid(w, s, z, scheme.maxq)


def from_codes(q: Tensor, s: Tensor, z: Tensor, scheme: Scheme) -> Tensor:
    """Codes back to values: (q - z) * s, or level[q] * s for a codebook."""
    if scheme.codebook is not None:
        return torch.tensor(scheme.codebook, dtype=torch.float32, device=q.device)[q.long()] * s
    return from_grid(q, s, z)


def quantize(
    w: Tensor,
    scheme: Scheme,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    g_idx: Tensor | None = None,
) -> QWeight:
    """Round-to-nearest codes of w [out, in]; min-max qparams unless scales (and zeros) are given."""
    if scales is None:
        scales, zeros = minmax_qparams(w, scheme)
    inp = w.shape[1]
    s = _expand(scales.float(), g_idx, inp, scheme)
    z = _expand(zero_values(zeros, scales, scheme), g_idx, inp, scheme)
    q = to_codes(w.float(), s, z, scheme)
    dtype = torch.uint8 if scheme.bits <= 8 else torch.int32
    return QWeight(q.to(dtype), scales, zeros, g_idx)


def dequantize(qw: QWeight, scheme: Scheme, dtype: torch.dtype = torch.float32) -> Tensor:
    """(q - z) * s, computed in fp32 and returned in `dtype`."""
    inp = qw.q.shape[1]
    s = _expand(qw.scales.float(), qw.g_idx, inp, scheme)
    z = _expand(zero_values(qw.zeros, qw.scales, scheme), qw.g_idx, inp, scheme)
    return from_codes(qw.q.float(), s, z, scheme).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: exactly dequantize(quantize(w)). Backward: straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, w, scheme, scales, zeros, g_idx):
        return dequantize(quantize(w, scheme, scales, zeros, g_idx), scheme, dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def fake_quantize(
    w: Tensor, scheme: Scheme, scales: Tensor | None = None, zeros: Tensor | None = None, g_idx: Tensor | None = None
) -> Tensor:
    """dequantize(quantize(w)) with a straight-through gradient for QAT; bit-identical forward."""
    return _FakeQuantSTE.apply(w, scheme, scales, zeros, g_idx)


class _RoundSTE(torch.autograd.Function):
    """torch.round forward (bit-identical), identity gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient. (Not `x + (x.round() - x).detach()`: in floating point
    that sum is not always exactly x.round(), and QAT's converted model must equal the fake-quant one exactly.)"""
    return _RoundSTE.apply(x)


def fake_quantize_learnable(
    w: Tensor, scheme: Scheme, scales: Tensor, zeros: Tensor | None = None, g_idx: Tensor | None = None
) -> Tensor:
    """dequantize(quantize(w, scheme, scales, round(zeros))) that is differentiable in w, scales and zeros (LSQ):
    rounding passes gradients straight through, the clamp to [0, maxq] stops them for clipped elements, and the
    scale gets the gradient of both the division and the multiplication. `zeros` are floats [out, n_groups],
    rounded and clamped to [0, maxq] here (None = symmetric). The forward values are bit-identical to
    `dequantize(quantize(...))` with those integer zero points, so converting a QAT model changes nothing."""
    inp = w.shape[1]
    if zeros is None:
        z_groups = zero_values(None, scales, scheme)
    else:
        z_groups = torch.clamp(round_ste(zeros), 0, scheme.maxq)
    s = _expand(scales.float(), g_idx, inp, scheme)
    z = _expand(z_groups.float(), g_idx, inp, scheme)
    return from_grid(round_to_grid(w.float(), s, z, scheme.maxq, rounding=round_ste), s, z).to(w.dtype)


def learned_codes(codes: Tensor, offsets: Tensor, maxq: int, rounding=torch.round) -> Tensor:
    """Codes moved by learned rounding offsets (in grid steps): clamp(round(codes + offsets), 0, maxq), as floats.
    `rounding=round_ste` while training (the offsets get straight-through gradients), torch.round to convert: the
    same values, so a trained layer converts to exactly the integers it computed with."""
    return torch.clamp(rounding(codes.float() + offsets), 0, maxq)


def dequantize_learnable_codes(
    codes: Tensor, offsets: Tensor, scheme: Scheme, scales: Tensor, zeros: Tensor | None = None, g_idx: Tensor | None = None
) -> Tensor:
    """(learned_codes - z) * s, differentiable in the rounding `offsets` [out, in] (straight through the rounding)
    and in the `scales` [out, n_groups] (exactly: the codes do not move with the scales, unlike LSQ, whose scale
    gradient vanishes for weights on their grid). `zeros` are the stored integer zero points (None = symmetric).
    The forward values equal `dequantize(QWeight(learned_codes(...), scales, zeros, g_idx))` bit for bit."""
    if scheme.codebook is not None:
        raise ValueError("learned rounding applies to integer grids, not codebooks")
    inp = codes.shape[1]
    s = _expand(scales.float(), g_idx, inp, scheme)
    z = _expand(zero_values(zeros, scales, scheme), g_idx, inp, scheme)
    return from_grid(learned_codes(codes, offsets, scheme.maxq, rounding=round_ste), s, z)


def mse_qparams(
    w: Tensor,
    scheme: Scheme,
    grid: int = 50,
    max_shrink: float = 0.5,
    norm: float = 2.0,
    row_chunk: int | None = None,
    col_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-group clipping search: the shrink factor in {1, 1 - max_shrink/grid, ..., 1 - max_shrink} with the
    least reconstruction error sum_j c_j |w_j - ŵ_j|^norm of that group (norm 2: mean squared error; c = 1, or
    `col_weights` [in], e.g. the Hessian diagonal, so inputs that carry more signal count more). Shrink 1 (plain
    min-max) is always a candidate, so the result is never worse than min-max on this objective.

    Rows are processed in chunks small enough to stay in cache (default ~128k values), with in-place arithmetic:
    the same values as the plain formulas, several times faster than whole-matrix temporaries.
    """
    shrinks = [1.0 - max_shrink * i / grid for i in range(grid + 1)]
    c = None if col_weights is None else _per_group(col_weights.float().reshape(1, -1), scheme)  # [1, G, gs]
    row_chunk = row_chunk or max(1, (1 << 17) // w.shape[1])
    best_scales, best_zeros = [], []
    for rows in torch.split(w.float(), row_chunk, dim=0):
        wg = _per_group(rows, scheme)
        rng = _group_range(wg, scheme)  # once: each candidate only scales it
        best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
        b_s, b_z = _range_qparams(rng, scheme, 1.0)
        d = torch.empty_like(wg)
        for p in shrinks:
            s, z = _range_qparams(rng, scheme, p)
            zv, sv = zero_values(z, s, scheme).unsqueeze(-1), s.unsqueeze(-1)
            if scheme.codebook is not None:
                d = (from_codes(to_codes(wg, sv, zv, scheme), sv, zv, scheme) - wg).abs_().pow_(norm)
            else:  # d = |from_grid(round_to_grid(wg, s, z), s, z) - wg|^norm, computed in place
                torch.div(wg, sv, out=d)
                d.round_().add_(zv).clamp_(0, scheme.maxq).sub_(zv).mul_(sv).sub_(wg).abs_().pow_(norm)
            err = (d if c is None else d.mul_(c)).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            b_s = torch.where(better, s, b_s)
            if z is not None:
                b_z = torch.where(better, z, b_z)
        best_scales.append(b_s)
        best_zeros.append(b_z)
    zeros = None if scheme.symmetric or scheme.codebook is not None else torch.cat(best_zeros)
    return torch.cat(best_scales), zeros


# ------------------------------------------------------------------------- llama.cpp's K-quant scale grid

SUPER_BLOCK = 256  # llama.cpp's K-quants: one fp16 scale d per 256 inputs of a row ...
# ... and every sub-block's scale an integer multiple k·d of it. For a symmetric llmq scheme, w = (q - 2^(b-1))·s
# with s = k·d is exactly a K-quant block: bits -> (GGUF type, sub-block width, largest multiple k). Q5_K, Q4_K and
# Q2_K store a min as well; symmetric codes use it as the fixed offset 2^(b-1)·s, so its multiple is k too.
KQUANTS: dict[int, tuple[str, int, int]] = {6: ("Q6_K", 16, 127), 5: ("Q5_K", 32, 63), 4: ("Q4_K", 32, 63),
                                            3: ("Q3_K", 16, 32), 2: ("Q2_K", 16, 15)}
FP16_TINY = 2.0**-24  # the smallest positive fp16 value (subnormal)


def kquant_type(scheme: Scheme, in_features: int) -> str | None:
    """The K-quant type ('Q6_K' | 'Q5_K' | 'Q4_K' | 'Q3_K' | 'Q2_K') that can hold this scheme's layers of
    `in_features` inputs exactly when their scales lie on its grid, or None: symmetric integer 2- to 6-bit, groups
    dividing 256 and made of whole sub-blocks, in_features a multiple of 256."""
    if scheme.format != "int" or not scheme.symmetric or scheme.bits not in KQUANTS or scheme.group_size is None:
        return None
    _, sub, _ = KQUANTS[scheme.bits]
    if in_features % SUPER_BLOCK or SUPER_BLOCK % scheme.group_size or scheme.group_size % sub:
        return None
    return KQUANTS[scheme.bits][0]


def kquant_scales(w: Tensor, scales: Tensor, scheme: Scheme, col_weights: Tensor | None = None) -> Tensor:
    """The group scales [out, G] of w [out, in] moved onto the K-quant grid of `kquant_type(scheme, in)`: per
    super-block of 256 inputs, d = the largest scale of a non-zero group / k_max rounded to fp16, and each group's
    scale k·d with k the one of the two multiples around scale / d (in 1..k_max) that quantizes the group with the
    smaller squared error (each input column weighted by col_weights[j] when given). fp32 holds k·d exactly."""
    out = w.shape[0]
    _, _, k_max = KQUANTS[scheme.bits]
    per_super = SUPER_BLOCK // scheme.group_size
    wg = _per_group(w.float(), scheme)  # [out, G, gs]
    live = (wg.abs().amax(dim=-1) > 0).reshape(out, -1, per_super)
    s = scales.float().reshape(out, -1, per_super)
    top = torch.where(live, s, torch.zeros_like(s)).amax(dim=-1, keepdim=True)
    d = (top / k_max).clamp(FP16_TINY, torch.finfo(torch.float16).max).to(torch.float16).float()
    low = torch.floor(s / d).clamp(1, k_max)
    c = None if col_weights is None else _per_group(col_weights.float().reshape(1, -1), scheme)
    centre = float(1 << (scheme.bits - 1))
    errors = []
    for k in (low, (low + 1).clamp(max=k_max)):
        sk = (k * d).reshape(out, -1, 1)
        e = (from_grid(round_to_grid(wg, sk, centre, scheme.maxq), sk, centre) - wg).pow_(2)
        errors.append((e if c is None else e.mul_(c)).sum(dim=-1).reshape(out, -1, per_super))
    k = torch.where(errors[1] < errors[0], (low + 1).clamp(max=k_max), low)
    return (k * d).reshape(out, -1)


def kquant_factors(scales: Tensor, scheme: Scheme) -> tuple[Tensor, Tensor] | None:
    """(d [out, in/256] fp16, k [out, in/256, groups per super-block] uint8 in 1..k_max) with k·d == scales exactly
    in fp32, or None when some super-block's scales are not on the K-quant grid (what `kquant_scales` produces is)."""
    _, _, k_max = KQUANTS[scheme.bits]
    out = scales.shape[0]
    s = scales.double().reshape(out, -1, SUPER_BLOCK // scheme.group_size)
    top = s.amax(dim=-1, keepdim=True)
    d = torch.zeros_like(top)
    for m in range(k_max, 0, -1):  # the largest scale is m·d for some m; the first m that factors the block
        cand = top / m
        k = s / cand
        ok = (cand.to(torch.float16).double() == cand) & ((k == k.round()) & (k >= 1) & (k <= k_max)).all(-1, keepdim=True)
        d = torch.where((d == 0) & ok, cand, d)
    k = (s / d).round()
    if bool((d == 0).any()) or not torch.equal((k * d).float(), scales.float().reshape(s.shape)):
        return None
    return d.squeeze(-1).to(torch.float16), k.to(torch.uint8)


def gguf_grid_scales(w: Tensor, scales: Tensor, scheme: Scheme, col_weights: Tensor | None = None) -> Tensor:
    """Scales llama.cpp's block types hold exactly: on the K-quant grid where `kquant_type` allows, else fp16 values
    (Q4_0 / Q4_1 / Q8_0 store one fp16 scale per block of 32)."""
    if kquant_type(scheme, w.shape[1]) is not None:
        return kquant_scales(w, scales, scheme, col_weights)
    return stored_scales(scales, torch.float16)


# ---------------------------------------------------------------------------------------------- packing


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words holding n codes of `bits` bits."""
    return (n * bits + 31) // 32


def _word_layout(bits: int) -> list[tuple[int, int]]:
    """Every 32 codes fill exactly `bits` words; for code i of such a block: (word index, bit shift)."""
    return [((i * bits) // 32, (i * bits) % 32) for i in range(32)]


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes [n, m] (values < 2**bits) along dim 0 into int32 [packed_len(n, bits), m]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, m = codes.shape
    pad = (-n) % 32
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, 0, 0, pad)).reshape(-1, 32, m)
    words = torch.zeros(c.shape[0], bits + 1, m, dtype=torch.int64, device=c.device)
    for i, (word, shift) in enumerate(_word_layout(bits)):
        words[:, word] |= c[:, i] << shift  # bits past 32 spill into the high half of the int64 ...
    spill = words[:, :-1] >> 32  # ... and move to the next word
    words[:, :-1] &= 0xFFFFFFFF
    words[:, 1:] |= spill
    out = words[:, :bits].reshape(-1, m)[: packed_len(n, bits)]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: int32 [packed_len(n, bits), m] → uint8 codes [n, m]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    m = packed.shape[1]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 0, 0, (-w.shape[0]) % bits)).reshape(-1, bits, m)
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)  # a zero word after each block for straddling codes
    mask = (1 << bits) - 1
    codes = torch.empty(w.shape[0], 32, m, dtype=torch.int64, device=w.device)
    for i, (word, shift) in enumerate(_word_layout(bits)):
        codes[:, i] = ((w[:, word] | (w[:, word + 1] << 32)) >> shift) & mask
    return codes.reshape(-1, m)[:n].to(torch.uint8)


def pack_qweight(qw: QWeight, scheme: Scheme, dtype: torch.dtype) -> dict[str, Tensor]:
    """QWeight → the on-disk tensors of one layer (GPTQ layout, true zero points)."""
    out, inp = qw.q.shape
    zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, 1 << (scheme.bits - 1), dtype=torch.int32)
    tensors = {
        "qweight": pack(qw.q.t(), scheme.bits),
        "scales": qw.scales.t().contiguous().to(dtype),
        "qzeros": pack(zeros.to(torch.int32), scheme.bits).t().contiguous(),
    }
    if qw.g_idx is not None:
        tensors["g_idx"] = qw.g_idx.to(torch.int32)
    return tensors


def stored_bits(out_features: int, in_features: int, scheme: Scheme, scale_dtype: torch.dtype, has_g_idx: bool) -> int:
    """Bits one layer's weight takes in an llmq checkpoint: exactly the tensors `pack_qweight` writes (codes, scales,
    zero points, g_idx; bias is not part of the weight)."""
    groups = scheme.n_groups(in_features)
    bits = packed_len(in_features, scheme.bits) * out_features * 32  # qweight
    bits += groups * out_features * torch.finfo(scale_dtype).bits  # scales
    bits += groups * packed_len(out_features, scheme.bits) * 32  # qzeros
    return bits + (in_features * 32 if has_g_idx else 0)


def unpack_qweight(
    qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor | None, scheme: Scheme, in_features: int
) -> QWeight:
    """The on-disk tensors of one layer → QWeight (zeros kept explicitly, also for symmetric layers)."""
    out = scales.shape[1]
    q = unpack(qweight, scheme.bits, in_features).t()
    zeros = unpack(qzeros.t(), scheme.bits, out).to(torch.int32)
    return QWeight(q, scales.t(), zeros, g_idx)
