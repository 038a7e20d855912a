"""Copies a kernel derives from a QuantLinear's buffers (a packed layout, a dequantized weight), kept on the layer.

Why it exists: the fast kernels do not read llmq's on-disk layout directly; each builds its own copy of a layer's
weights once and reuses it. Two kernels need the same bookkeeping — build on first use, rebuild when a buffer was
replaced or written in place (load_state_dict after a first forward), drop when the kernel changes — so it lives
here once. Under torch.compile the staleness check is skipped (it reads data pointers and version counters, which
a traced graph cannot): a model is compiled after its weights are loaded, and `prepare` builds the copies eagerly
so that the compiled forward finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every quantized layer of `model` (a QuantLinear: any module with `choose_kernel`)."""
    return [m for m in model.modules() if callable(getattr(m, "choose_kernel", None))]


def buffers_key(layer) -> tuple:
    """Identity of the layer's quantized buffers: changes when one is replaced (a new data pointer: another tensor,
    dtype or device) or written in place (its version counter). Runs on every eager forward, so it is kept lean."""
    key = []
    for t in (layer.qweight, layer.scales, layer.qzeros, layer.g_idx):
        if t is None:
            key.append(None)
        else:  # inference tensors (made under torch.inference_mode) have no version counter: they cannot change
            key += (t.data_ptr(), -1 if t.is_inference() else t._version)
    return tuple(key)


def cached(layer, attr: str, build: Callable[[Any, tuple], Any]) -> Any:
    """`layer.<attr>`, built by `build(layer, key)` on first use and rebuilt when the buffers changed. The built
    object must carry the key it was built for as `.key`."""
    found = layer.__dict__.get(attr)
    if torch.compiler.is_compiling():
        if found is None:
            raise RuntimeError(f"{type(layer).__name__}: its {attr} copy is built before compiling; call "
                               "llmq.kernels.prepare(model) (or run one forward) before torch.compile")
        return found
    key = buffers_key(layer)
    if found is None or found.key != key:
        found = build(layer, key)
        layer.__dict__[attr] = found
    return found
