"""Round-to-nearest PTQ: each weight to its nearest level under min-max (or MSE-searched) group qparams.

No data, no model forward: the baseline every other method must beat, and the fastest path to a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import numerics
from ..numerics import QWeight, Scheme
from ..recipe import MethodConfig


def quantize_weight(w: torch.Tensor, scheme: Scheme, method: MethodConfig, scale_dtype: torch.dtype) -> QWeight:
    """RTN one weight [out, in] as the recipe's method section says; scales are rounded to the storage dtype
    before the codes are chosen."""
    if method.clip == "mse":
        scales, zeros = numerics.mse_qparams(
            w, scheme, grid=method.clip_grid, max_shrink=method.clip_max_shrink, norm=method.clip_norm
        )
    else:
        scales, zeros = numerics.minmax_qparams(w, scheme)
    # what is stored is what the codes must fit; never let a tiny scale round to zero in fp16 / bf16
    scales = scales.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
    return numerics.quantize(w, scheme, scales, zeros)


def rtn(
    model: nn.Module, layers: dict[str, nn.Linear], scheme: Scheme, method: MethodConfig, scale_dtype: torch.dtype, calibration=None
) -> dict[str, QWeight]:
    """{name: QWeight} for every targeted Linear layer; RTN needs neither the rest of the model nor data."""
    out = {}
    with torch.no_grad():
        for name, layer in tqdm(layers.items(), desc=f"RTN W{scheme.bits}", unit="layer", leave=False):
            out[name] = quantize_weight(layer.weight.data, scheme, method, scale_dtype)
    return out
