"""llmq: quantize Hugging Face causal LMs and measure what it cost.

    import llmq
    result = llmq.run("recipes/quickstart.yaml")          # quantize, save, reload, evaluate, report
    model = llmq.load("out/quickstart")                   # == AutoModelForCausalLM.from_pretrained, checked
    model = AutoModelForCausalLM.from_pretrained("some/model", quantization_config=llmq.LlmqConfig(bits=4, group_size=128))
                                                          # RTN while loading, one weight at a time

Importing llmq registers `quant_method: "llmq"` with transformers, so `AutoModelForCausalLM.from_pretrained`
loads llmq checkpoints as QuantLinear layers. `llmq.formats` exports them to GPTQ / compressed-tensors and imports
those formats back. Messages go to the "llmq" logger (silence it with logging.getLogger("llmq").setLevel(...)).
"""

from . import calibration, formats
from .checkpoint import hf as _hf
from .checkpoint.config import LlmqConfig
from .errors import BadInputError, LlmqError
from .loading import load_model as load
from .numerics import QWeight, Scheme
from .pipeline import quantize, run, validate
from .recipe import Recipe
from .version import __version__

_hf.register()

__all__ = [
    "BadInputError", "LlmqConfig", "LlmqError", "QWeight", "Recipe", "Scheme", "__version__",
    "calibration", "formats", "load", "quantize", "run", "validate",
]
