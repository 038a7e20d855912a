"""Quantization methods, registered by name in an explicit dict (no package scanning).

Every method has one signature, `method(model, layers, scheme, method_config, scale_dtype, calibration)`:
the model (GPTQ walks its decoder blocks), the targeted Linear layers by name, the scheme, the recipe's method
section, the dtype scales are stored in, and calibration token windows (None for methods that need no data).
It returns `{layer_name: QWeight}`; turning those into runtime modules is `modules.replace_linears`' job.
"""

from .rtn import rtn

METHODS = {"rtn": rtn}
