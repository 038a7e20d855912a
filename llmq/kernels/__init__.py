"""Kernel choice per layer. `select(scheme, device)` returns the matmul a QuantLinear calls.

- CUDA: the Triton WnA16 kernels (triton_wna16.py) when triton is installed, else the torch reference.
- CPU: cpu.py — torch's packed int4 / int8 ops for bf16 activations, the exact reference for everything else.
- Anything else: the torch reference (torch_ref.py), which is also the oracle every kernel is tested against.

`LLMQ_KERNEL=reference|cpu|triton` in the environment, or `use(model, name)` on a loaded model, overrides the
choice (benchmarks compare kernels side by side this way; `reference` reproduces the exact math). Choosing a
kernel sets an attribute on one layer instance; it never patches a class for everyone. triton is imported only
when a CUDA device or the `triton` kernel asks for it: CPU runs never load it, and tests that run the kernels under
TRITON_INTERPRET=1 can set that flag before triton first reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..errors import BadInputError
from ..numerics import Scheme
from . import cpu, torch_ref

Kernel = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]
NAMES = ("reference", "cpu", "triton")
ENV = "LLMQ_KERNEL"


def _triton():
    from . import triton_wna16

    return triton_wna16


def by_name(name: str) -> Kernel:
    """The kernel called `name` (one of NAMES)."""
    if name == "reference":
        return torch_ref.linear
    if name == "cpu":
        return cpu.linear
    if name == "triton":
        return _triton().linear
    raise BadInputError(f"kernel {name!r}: expected one of {['auto', *NAMES]} (from {ENV} or kernels.use)")


def name_of(kernel: Kernel) -> str:
    """The NAMES entry of a kernel function ('custom' for anything else)."""
    module = getattr(kernel, "__module__", "") or ""
    return {f"{__name__}.torch_ref": "reference", f"{__name__}.cpu": "cpu", f"{__name__}.triton_wna16": "triton"}.get(
        module, "custom")


def select(scheme: Scheme, device: torch.device | str, name: str | None = None) -> Kernel:
    """The kernel for `scheme` on `device`: `name` (or $LLMQ_KERNEL) when given, else the fastest correct one."""
    name = name or os.environ.get(ENV) or "auto"
    device = torch.device(device)
    if name != "auto":
        kernel = by_name(name)
        if name == "triton" and not _triton().supported(scheme, device):
            raise BadInputError(f"kernel 'triton' cannot run {scheme} on {device} (needs triton and a CUDA device)")
        return kernel
    if device.type == "cuda" and _triton().supported(scheme, device):
        return _triton().linear
    if device.type == "cpu":
        return cpu.linear
    return torch_ref.linear


def use(model: torch.nn.Module, name: str) -> int:
    """Make every quantized layer of `model` (a QuantLinear: any module with `choose_kernel`) run kernel `name`
    ('auto' = the default choice); returns how many."""
    if name != "auto":
        by_name(name)  # an unknown name fails here, before any layer changed
    layers = [m for m in model.modules() if callable(getattr(m, "choose_kernel", None))]
    for layer in layers:
        layer.choose_kernel(layer.qweight.device, name)
    return len(layers)
