"""Kernel choice per layer. `select(scheme, device)` returns the matmul a QuantLinear calls.

Only the torch reference exists so far; Triton (GPU) and packed CPU kernels register here when they land.
Choosing a kernel sets an attribute on one layer instance; it never patches a class for everyone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..numerics import Scheme
from . import torch_ref

Kernel = Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]


def select(scheme: Scheme, device: torch.device | str) -> Kernel:
    """The fastest correct kernel for `scheme` on `device` (today: the torch reference everywhere)."""
    return torch_ref.linear
