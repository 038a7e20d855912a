"""Kernel choice per layer. `select(scheme, device)` returns the matmul a QuantLinear calls.

- CUDA: the Triton WnA16 kernels (triton_wna16.py) when triton is installed, else the torch reference.
- CPU: cpu.py — torch's packed int4 / int8 ops for bf16 activations, the exact reference for everything else.
- Anything else: the torch reference (torch_ref.py), which is also the oracle every kernel is tested against.

`LLMQ_KERNEL=reference|cpu|triton` in the environment, or `use(model, name)` on a loaded model, overrides the
choice (benchmarks compare kernels side by side this way; `reference` reproduces the exact fp32 math). Choosing a
kernel sets an attribute on one layer instance; it never patches a class for everyone.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..errors import BadInputError
from ..numerics import Scheme
from . import cpu, torch_ref, triton_wna16

Kernel = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]
KERNELS: dict[str, Kernel] = {"reference": torch_ref.linear, "cpu": cpu.linear, "triton": triton_wna16.linear}
ENV = "LLMQ_KERNEL"


def select(scheme: Scheme, device: torch.device | str, name: str | None = None) -> Kernel:
    """The kernel for `scheme` on `device`: `name` (or $LLMQ_KERNEL) when given, else the fastest correct one."""
    name = name or os.environ.get(ENV) or "auto"
    if name != "auto":
        if name not in KERNELS:
            raise BadInputError(f"kernel {name!r}: expected one of {['auto', *KERNELS]} (from {ENV} or kernels.use)")
        if name == "triton" and not triton_wna16.supported(scheme, torch.device(device)):
            raise BadInputError(f"kernel 'triton' cannot run {scheme} on {device} (needs triton and a CUDA device)")
        return KERNELS[name]
    device = torch.device(device)
    if device.type == "cuda" and triton_wna16.supported(scheme, device):
        return triton_wna16.linear
    if device.type == "cpu":
        return cpu.linear
    return torch_ref.linear


def use(model: torch.nn.Module, name: str) -> int:
    """Make every QuantLinear of `model` run kernel `name` ('auto' = the default choice); returns how many."""
    from ..modules import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.choose_kernel(layer.qweight.device, name)
    return len(layers)
