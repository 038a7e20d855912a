"""Reference kernel: unpack, dequantize with numerics.py, then a plain matmul.

It is the fallback on every device and the oracle every faster kernel is tested against, so it is written
for clarity, not speed: no caching, no fused tricks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import numerics


def dequantized_weight(layer) -> torch.Tensor:
    """The layer's weight [out, in] as (q - z) * s, in the dtype of its scales."""
    qw = numerics.unpack_qweight(
        layer.qweight, layer.scales, layer.qzeros, getattr(layer, "g_idx", None), layer.scheme, layer.in_features
    )
    return numerics.dequantize(qw, layer.scheme, dtype=layer.scales.dtype)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    w = dequantized_weight(layer).to(x.dtype)
    return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))
