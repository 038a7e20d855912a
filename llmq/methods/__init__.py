"""Quantization methods, registered by name in an explicit dict (no package scanning).

Each method takes the targeted Linear layers (and, when it needs them, calibration batches) and returns
`{layer_name: QWeight}`; turning those into runtime modules is `modules.replace_linears`' job.
"""

from .rtn import rtn

METHODS = {"rtn": rtn}
