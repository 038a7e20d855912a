"""Kernel choice per layer. `select(scheme, device)` returns the matmul a QuantLinear calls.

- CUDA: the Triton WnA16 kernels (triton_wna16.py) when triton is installed, else the torch reference.
- CPU: cpu.py — torch's packed int4 / int8 ops (bf16 inside), the exact reference for layers they cannot hold.
- Anything else: the torch reference (torch_ref.py, the custom op `llmq::dequant_linear`), which is also the oracle
  every kernel is tested against.
- dense.py is chosen, not selected: it dequantizes once and keeps the weight (reference-exact, base-model memory);
  evaluations of fp32 models run inside `dense.exact_dense(model)`.

`prepare(model)` builds every layer's derived copy (packed layout, dense weight) up front, so a model compiled with
torch.compile traces plain tensor ops with no per-call Python bookkeeping.

`LLMQ_KERNEL=reference|cpu|triton|dense` in the environment, or `use(model, name)` on a loaded model, overrides the
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
from . import cpu, dense, torch_ref
from .derived import quantized_layers

Kernel = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]
NAMES = ("reference", "cpu", "triton", "dense")
ENV = dense.ENV  # "LLMQ_KERNEL", defined in dense.py, whose exact_dense honours it too


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
    if name == "dense":
        return dense.linear
    raise BadInputError(f"kernel {name!r}: expected one of {['auto', *NAMES]} (from {ENV} or kernels.use)")


def name_of(kernel: Kernel) -> str:
    """The NAMES entry of a kernel function ('custom' for anything else)."""
    module = getattr(kernel, "__module__", "") or ""
    return {f"{__name__}.torch_ref": "reference", f"{__name__}.cpu": "cpu", f"{__name__}.triton_wna16": "triton",
            f"{__name__}.dense": "dense"}.get(module, "custom")


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


def drop_derived(layer: torch.nn.Module) -> None:
    """Free every kernel's derived copy of the layer's weights."""
    for attr in (cpu.ATTR, dense.ATTR):
        layer.__dict__.pop(attr, None)


def prepare(model: torch.nn.Module) -> int:
    """Settle every quantized layer's kernel for the device it is on and build the copy that kernel reads (the
    CPU's packed layout, the dense weight), so the first forward — or a torch.compile trace — does no set-up.
    Returns how many layers were prepared. Call it again after moving the model or changing its weights."""
    layers = [m for m in quantized_layers(model) if not m.qweight.is_meta]
    for layer in layers:
        device = layer.qweight.device
        if device != layer._kernel_device:
            layer.choose_kernel(device, layer._kernel_name)
        if callable(getattr(layer, "prepare", None)):
            layer.prepare()  # a layer's own set-up (a quantized embedding's unpacked zero points)
        if getattr(layer, "serves_head", True) is False:
            continue  # an embedding no matmul reads (its head is not tied to it): no kernel copy
        if layer.kernel is cpu.linear and device.type == "cpu":
            cpu.packed_for(layer)
        elif layer.kernel is dense.linear:
            dense.dense_for(layer)
    return len(layers)


def use(model: torch.nn.Module, name: str) -> int:
    """Make every quantized layer of `model` (a QuantLinear: any module with `choose_kernel`) run kernel `name`
    ('auto' = the default choice); returns how many."""
    if name != "auto":
        by_name(name)  # an unknown name fails here, before any layer changed
    layers = quantized_layers(model)
    for layer in layers:
        layer.choose_kernel(layer.qweight.device, name)
    return len(layers)
