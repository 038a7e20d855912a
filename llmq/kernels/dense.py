"""The dense kernel: dequantize a layer once, keep the full weight, and run a plain F.linear.

Why it exists: the reference kernel dequantizes the whole weight on *every* forward, which made an exact fp32
evaluation of a quantized model ~2.2x slower than its base. The dense kernel computes exactly what the reference
computes — the same `dequantized_weight(layer).to(x.dtype)` and the same F.linear, so its outputs are
bit-identical — but dequantizes once, at the price of holding the full-precision weight (the base model's
memory). That trade is right for an evaluation, which `exact_dense(model)` scopes: every fp32 layer runs dense
inside the `with` block and gets its own kernel back, and its dense copy freed, on leaving it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import derived, torch_ref

ATTR = "_dense_weight"
ENV = "LLMQ_KERNEL"  # the user's kernel choice (kernels.ENV); here because kernels/__init__ imports this module


@dataclass
class _Dense:
    key: tuple
    weight: torch.Tensor  # [out, in] in the dtype of the layer's scales, as the reference computes it


def dense_for(layer) -> _Dense:
    """The layer's dequantized weight, computed on first use and again when any of its buffers changed."""
    return derived.cached(layer, ATTR, lambda lay, key: _Dense(key, torch_ref.dequantized_weight(lay)))


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """Exactly torch_ref.linear, with the dequantized weight computed once per layer."""
    w = dense_for(layer).weight
    return F.linear(x, w.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


@contextmanager
def exact_dense(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every quantized layer with fp32 scales (a model loaded in fp32, from_pretrained's default)
    runs the dense kernel: reference-exact numbers at the base model's speed, for evaluations. Layers in bf16 / fp16
    keep their kernel (their fast kernels are what a user of that dtype runs), and so does a kernel the user chose
    ($LLMQ_KERNEL, kernels.use): that is how to evaluate another kernel. Yields how many layers it switched."""
    if os.environ.get(ENV, "auto") != "auto":
        yield 0
        return
    layers = [m for m in derived.quantized_layers(model)
              if m.scales.dtype == torch.float32 and not m.qweight.is_meta and m._kernel_name is None]
    for m in layers:
        m.choose_kernel(m.qweight.device, "dense")
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.choose_kernel(m.qweight.device, None)  # back to the default choice; frees the dense copy
