"""Quantization methods, registered by name in an explicit dict (no package scanning).

PTQ methods quantize the targeted Linear layers of one decoder block at a time:
`quantize_block(block, names, job) -> {name: QWeight}` with names relative to the block and a `BlockJob`
holding the scheme, the recipe's method section and, when `needs_calibration`, the calibration activations
entering the block. The block walk (quantization/blockwise.py) feeds blocks one at a time, from memory or from
disk; turning QWeights into runtime modules is `checkpoint.quant_linear.replace_linears`' job. QAT (qat/) has
two modes: block-wise (`qat/block_ap.py`, a block method built on rtn or gptq that also needs the full-precision
activations: `needs_reference`), and whole-model (fake-quant layers and a training loop; quantization/qat.py runs
it), which trains the whole model at once from one of the block methods' results and has no `quantize_block`.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

from ..recipe import METHOD_NAMES, MethodConfig
from .gptq import gptq_block
from .job import BlockJob
from .qat.block_ap import qat_block
from .rtn import rtn_block


class Method(NamedTuple):
    quantize_block: Callable | None  # None: a whole-model method (qat), not a block walk
    needs_calibration: bool
    needs_reference: bool = False  # trains against the full-precision model's block outputs (job.targets)


METHODS = {
    "rtn": Method(rtn_block, needs_calibration=False),
    "gptq": Method(gptq_block, needs_calibration=True),
    "qat": Method(None, needs_calibration=False),
}
assert tuple(METHODS) == METHOD_NAMES, "every method name a recipe accepts has exactly one implementation"


def needs_calibration(method: MethodConfig) -> bool:
    """Whether a recipe's method needs calibration windows: GPTQ does, and so does QAT started from GPTQ or trained
    block by block (on the calibration activations)."""
    return method.blockwise or METHODS[method.init_method].needs_calibration


def block_method(method: MethodConfig) -> Method | None:
    """What the block walk runs per block for this method: rtn, gptq, or block-wise QAT; None for whole-model QAT."""
    if method.blockwise:
        return Method(functools.partial(qat_block, init=METHODS[method.init].quantize_block), needs_calibration=True,
                      needs_reference=True)
    found = METHODS[method.name]
    return found if found.quantize_block is not None else None


__all__ = ["METHODS", "BlockJob", "Method", "block_method", "needs_calibration"]
