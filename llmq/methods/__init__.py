"""Quantization methods, registered by name in an explicit dict (no package scanning).

A method quantizes the targeted Linear layers of one decoder block at a time:
`quantize_block(block, names, job) -> {name: QWeight}` with names relative to the block and a `BlockJob`
holding the scheme, the recipe's method section and, when `needs_calibration`, the calibration activations
entering the block. The block walk (blockwise.py) feeds blocks one at a time, from memory or from disk; turning
QWeights into runtime modules is `modules.replace_linears`' job.
"""

from collections.abc import Callable
from typing import NamedTuple

from .gptq import gptq_block
from .job import BlockJob
from .rtn import rtn_block


class Method(NamedTuple):
    quantize_block: Callable
    needs_calibration: bool


METHODS = {"rtn": Method(rtn_block, needs_calibration=False), "gptq": Method(gptq_block, needs_calibration=True)}

__all__ = ["METHODS", "BlockJob", "Method"]
