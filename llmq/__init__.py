"""llmq: quantize Hugging Face causal LMs and measure what it cost.

    import llmq
    result = llmq.run("recipes/quickstart.yaml")          # quantize, save, reload, evaluate, report
    model = llmq.load("out/quickstart")                   # == AutoModelForCausalLM.from_pretrained, checked

Importing llmq registers `quant_method: "llmq"` with transformers, so `AutoModelForCausalLM.from_pretrained`
loads llmq checkpoints as QuantLinear layers. `llmq.formats` exports them to GPTQ / compressed-tensors and imports
those formats back.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmq")  # single source of truth: pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from . import calibration, formats
from . import hf as _hf
from .errors import BadInputError, LlmqError
from .models import load_model as load
from .numerics import QWeight, Scheme
from .pipeline import quantize, run, validate
from .recipe import Recipe

_hf.register()

__all__ = [
    "BadInputError", "LlmqError", "QWeight", "Recipe", "Scheme", "__version__",
    "calibration", "formats", "load", "quantize", "run", "validate",
]
