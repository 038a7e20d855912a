"""Reference kernel: unpack, dequantize with numerics.py, then a plain matmul — registered as the custom op
`llmq::dequant_linear`.

It is the fallback on every device and the oracle every faster kernel is tested against, so it is written
for clarity, not speed: no caching, no fused tricks. It is a `torch.library` custom op with a fake (meta)
implementation so that torch.compile traces a model whose layers fall back to it as one opaque node per layer,
without graph breaks (the unpacking is integer bit work that a graph gains nothing from seeing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import numerics


def dequantized_weight(layer) -> torch.Tensor:
    """The layer's weight [out, in] as (q - z) * s, in the dtype of its scales."""
    return _dequantize(layer.qweight, layer.scales, layer.qzeros, getattr(layer, "g_idx", None), layer.scheme,
                       layer.in_features)


def _dequantize(qweight, scales, qzeros, g_idx, scheme: numerics.Scheme, in_features: int) -> torch.Tensor:
    qw = numerics.unpack_qweight(qweight, scales, qzeros, g_idx, scheme, in_features)
    return numerics.dequantize(qw, scheme, dtype=scales.dtype)


@torch.library.custom_op("llmq::dequant_linear", mutates_args=())
def dequant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
    bias: torch.Tensor | None, bits: int, group_size: int | None, symmetric: bool, fmt: str, in_features: int,
) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) for the scheme given by (bits, group_size, symmetric, fmt)."""
    scheme = numerics.Scheme(bits=bits, group_size=group_size, symmetric=symmetric, format=fmt)
    w = _dequantize(qweight, scales, qzeros, g_idx, scheme, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@dequant_linear.register_fake
def _(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, symmetric, fmt, in_features):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    s = layer.scheme
    return dequant_linear(x, layer.qweight, layer.scales, layer.qzeros, getattr(layer, "g_idx", None), layer.bias,
                          s.bits, s.group_size, s.symmetric, s.format, layer.in_features)
