"""llmq: quantize Hugging Face causal LMs and measure what it cost.

    import llmq
    result = llmq.run("recipes/quickstart.yaml")          # quantize, save, reload, evaluate, report
    model = llmq.load("out/quickstart")                   # == AutoModelForCausalLM.from_pretrained, checked

Importing llmq registers `quant_method: "llmq"` with transformers, so `AutoModelForCausalLM.from_pretrained`
loads llmq checkpoints as QuantLinear layers. `llmq.formats` exports them to GPTQ / compressed-tensors and imports
those formats back. Messages go to the "llmq" logger (silence it with logging.getLogger("llmq").setLevel(...)).
"""

from . import calibration, formats
from .checkpoint import hf as _hf
from .errors import BadInputError, LlmqError
from .loading import load_model as load
from .numerics import QWeight, Scheme
from .pipeline import quantize, run, validate
from .recipe import Recipe
from .version import __version__

_hf.register()

__all__ = [
    "BadInputError", "LlmqError", "QWeight", "Recipe", "Scheme", "__version__",
    "calibration", "formats", "load", "quantize", "run", "validate",
]
