"""Packed low-bit matmuls for CPUs, through torch's weight-only int4 / int8 kernels.

Why it exists: the reference kernel dequantizes a whole weight on every forward, so on a CPU a quantized model
ran slower than its base. torch ships vectorised kernels that read packed weights directly —
`_weight_int4pack_mm_for_cpu` (4-bit codes, per-group scale and zero) and `_weight_int8pack_mm` (int8 codes,
per-channel scale). Measured on this project's 2-core AVX512 machine at M = 1 (576 x 1536 layers, weights cold in
cache) they take ~10-20 µs against ~80-230 µs for an fp32 F.linear — but only with bf16 activations: with fp32
or fp16 inputs the same ops take a scalar path ~40x slower than with bf16. So the ops always get bf16: fp32 and
fp16 activations are rounded to bf16 on the way in and the output is cast back. That is the default load path
(from_pretrained without a dtype gives fp32), and it is not exact: the activations, the per-group (scale, zero)
pairs and the op's output each carry bf16 rounding (relative 2^-9), far below the quantization error itself;
tests bound it against the reference. Exact fp32 numbers, for evaluations, come from the dense kernel
(dense.exact_dense). Shapes the ops refuse go to the exact torch reference.

How the llmq layout maps onto them (numerics.py: w = (q - z) * s):
- 2, 3 and 4 bits: every code fits a 4-bit slot and (q - z)·s = (q - 8)·s + (8 - z)·s, which is torch's
  (scale, zero) pair per group (2- and 3-bit codes shifted to the middle of the slot, which keeps both terms small). Per-channel layers use the largest of 256/128/64/32 dividing K with the scale
  repeated (exact). Act-order `g_idx`: the input columns are permuted once so that groups are contiguous, and
  every input is permuted the same way at run time.
- 8 bits, one group per row: the int8 op on q - 128, plus the rank-one term s·(128 - z)·Σx for zero points
  other than 128 (computed in fp32).
- Not served (reference instead): 8-bit with several groups (no torch op), N not a multiple of 16, groups
  of other sizes, act-order groups of unequal size.

The packed copy is built once per layer (derived.py), after loading or at its first forward, and rebuilt whenever
a buffer is replaced or written in place. It costs one more copy of the codes in memory (the llmq buffers stay:
they are what save_pretrained writes). The forward is plain aten calls, which torch.compile traces as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import numerics
from . import derived, torch_ref

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
ATTR = "_cpu_packed"


@dataclass
class _Packed:
    """One layer's weights in the layout of a torch CPU op; `op` None = this layer takes the reference."""

    key: tuple
    op: str | None = None  # "int4" | "int8" | None
    weight: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # int4: [K/g, N, 2] (scale, zero) bf16; int8: [N] bf16
    group_size: int = 0
    perm: torch.Tensor | None = None  # act-order input permutation (int4)
    offset: torch.Tensor | None = None  # int8 asymmetric: s * (128 - z) [N] fp32, or None
    reason: str = ""


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y = x Wᵀ + b for a QuantLinear through a packed torch op (bf16 inside, any float dtype outside) when the
    layer is on the CPU and the ops can hold it, else the reference."""
    if x.device.type != "cpu" or not x.is_floating_point():
        return torch_ref.linear(x, layer)
    packed = packed_for(layer)
    if packed.op is None:
        return torch_ref.linear(x, layer)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if packed.op == "int4":
        if packed.perm is not None:
            x2 = x2.index_select(1, packed.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed.weight, packed.group_size, packed.scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), packed.weight, packed.scales)
        if packed.offset is not None:
            y = y.float() + x2.float().sum(-1, keepdim=True) * packed.offset
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def packed_for(layer) -> _Packed:
    """The layer's packed copy, built on first use and rebuilt when any of its buffers changed."""
    return derived.cached(layer, ATTR, _pack)


def _pack(layer, key: tuple) -> _Packed:
    scheme, k, n = layer.scheme, layer.in_features, layer.out_features
    if scheme.format != "int":
        return _Packed(key, reason=f"format {scheme.format}")
    if layer.qweight.device.type != "cpu" or layer.qweight.is_meta:
        return _Packed(key, reason="weights not on the CPU")
    qw = numerics.unpack_qweight(layer.qweight, layer.scales, layer.qzeros, layer.g_idx, scheme, k)
    if scheme.bits <= 4:
        return _pack_int4(qw, scheme, k, n, key)
    if scheme.bits == 8 and scheme.n_groups(k) == 1:
        return _pack_int8(qw, key)
    if scheme.bits == 8:
        return _Packed(key, reason="8-bit with several groups per row")
    return _Packed(key, reason=f"{scheme.bits}-bit (torch's CPU ops take 4 and 8 bits)")


def _pack_int4(qw: numerics.QWeight, scheme: numerics.Scheme, k: int, n: int, key: tuple) -> _Packed:
    if n % 16:
        return _Packed(key, reason=f"out_features {n} not a multiple of 16")
    gs = scheme.group_size
    if gs is None:
        gs = next((g for g in INT4_GROUP_SIZES if k % g == 0), None)
        if gs is None:
            return _Packed(key, reason=f"no group size in {INT4_GROUP_SIZES} divides in_features {k}")
    elif gs not in INT4_GROUP_SIZES or k % gs:
        return _Packed(key, reason=f"group size {gs}")
    q, scales, zeros = qw.q.to(torch.int32), qw.scales.float(), qw.zeros.float()  # [N, K], [N, G], [N, G]
    perm = None
    if scheme.group_size is None:
        reps = k // gs  # the one per-row group, repeated over K/gs slots: exact
        scales, zeros = scales.expand(n, reps), zeros.expand(n, reps)
    elif qw.g_idx is not None and not torch.equal(qw.g_idx.long(), torch.arange(k) // gs):
        g_idx = qw.g_idx.long()
        if not torch.equal(torch.bincount(g_idx, minlength=scales.shape[1]), torch.full((scales.shape[1],), gs)):
            return _Packed(key, reason="act-order groups of unequal size")
        perm = torch.argsort(g_idx, stable=True)
        q = q[:, perm]
    # codes of fewer than 4 bits sit centred in the 4-bit slot (2-bit 0..3 -> 6..9), so that the op's (q - 8)·s and
    # its bf16 zero term (8 - z)·s stay small instead of cancelling: less bf16 rounding than at the slot's edge
    shift = 8 - (1 << (scheme.bits - 1))
    q, zeros = q + shift, zeros + shift
    scale_zero = torch.stack([scales.t(), ((8 - zeros) * scales).t()], dim=-1)  # [K/g, N, 2]
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    return _Packed(key, "int4", weight, scale_zero.to(torch.bfloat16).contiguous(), gs, perm)


def _pack_int8(qw: numerics.QWeight, key: tuple) -> _Packed:
    s, z = qw.scales[:, 0].float(), qw.zeros[:, 0].float()  # one group per row
    weight = (qw.q.to(torch.int16) - 128).to(torch.int8).contiguous()
    offset = None if torch.all(z == 128) else s * (128 - z)
    return _Packed(key, "int8", weight, s.to(torch.bfloat16), offset=offset)

