"""What a method is handed for one decoder block: the scheme, the recipe's method section, and (for methods
that need data) the calibration activations entering the block. One small dataclass, so method signatures stay
short and every method sees the same things."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..numerics import Scheme
from ..recipe import MethodConfig

if TYPE_CHECKING:
    from ..calibration import BlockInputs


@dataclass
class BlockJob:
    scheme: Scheme
    config: MethodConfig
    scale_dtype: torch.dtype
    inputs: BlockInputs | None = None  # calibration activations entering this block (None for data-free methods)
    clusters: list[list[str]] | None = None  # the block's Linear layers in call order, grouped by shared input
    log: Callable[[dict[str, Any]], None] = field(default=lambda row: None)  # one row per quantized layer
    schemes: dict[str, Scheme] = field(default_factory=dict)  # layers (block-relative names) whose scheme is not `scheme`
    # block-wise QAT: the full-precision model's outputs of this block, per calibration batch (its training target)
    targets: list[torch.Tensor] | None = None
    step_budget: Any = None  # block-wise QAT with block_minutes: its StepBudget, shared by every block of the walk
    blocks_left: int = 1  # this block and the ones after it
    advanced: bool = False  # the method already advanced `inputs` through the finished block (the walk must not again)

    def scheme_for(self, name: str) -> Scheme:
        """The scheme of the block's layer `name` (recipe overrides and budgets give layers their own)."""
        return self.schemes.get(name, self.scheme)
