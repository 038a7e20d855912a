"""Round-to-nearest PTQ: each weight to its nearest level under min-max (or MSE-searched) group qparams.

No data, no model forward: the baseline every other method must beat, and the fastest path to a checkpoint.
`layer_qparams` is also how GPTQ chooses the qparams of each group, so both methods clip the same way.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import numerics
from ..numerics import QWeight, Scheme
from ..recipe import MethodConfig
from .job import BlockJob


def layer_qparams(
    w: torch.Tensor,
    scheme: Scheme,
    method: MethodConfig,
    scale_dtype: torch.dtype,
    col_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of w [out, in] per the recipe's clipping (the search weighing input column j's error
    by col_weights[j] when given), with scales rounded to the dtype they are stored in (what is stored is what the
    codes must fit; a tiny scale never rounds to zero in fp16 / bf16), or with `gguf_grid` moved onto llama.cpp's."""
    if method.clip == "mse":
        scales, zeros = numerics.mse_qparams(
            w, scheme, grid=method.clip_grid, max_shrink=method.clip_max_shrink, norm=method.clip_norm,
            col_weights=col_weights,
        )
    else:
        scales, zeros = numerics.minmax_qparams(w, scheme)
    if method.gguf_grid:  # scales llama.cpp's block types hold exactly (preflight: stored in float32)
        return numerics.gguf_grid_scales(w, scales, scheme, col_weights), zeros
    return numerics.stored_scales(scales, scale_dtype), zeros


def quantize_weight(w: torch.Tensor, scheme: Scheme, method: MethodConfig, scale_dtype: torch.dtype) -> QWeight:
    """RTN one weight [out, in] as the recipe's method section says."""
    scales, zeros = layer_qparams(w, scheme, method, scale_dtype)
    return numerics.quantize(w, scheme, scales, zeros)


def rtn_block(block: nn.Module, names: list[str], job: BlockJob) -> dict[str, QWeight]:
    """{name: QWeight} for the named Linear layers of `block`; RTN needs neither the forward pass nor data."""
    out = {}
    with torch.no_grad():
        for name in names:
            t = time.perf_counter()
            w = block.get_submodule(name).weight.data
            scheme = job.scheme_for(name)
            out[name] = quantize_weight(w, scheme, job.config, job.scale_dtype)
            err = (numerics.dequantize(out[name], scheme) - w.float()).pow(2).mean().item()
            job.log({"layer": name, "method": "rtn", "weight_mse": err, "seconds": time.perf_counter() - t})
    return out
