"""`llmq run` and `llmq validate`: the checks before heavy work (`preflight.py`) and the run's stages (`stages.py`)."""

from ..quantization.in_memory import quantize
from .preflight import as_recipe, check_model_shapes, eval_suite, scheme_label, validate
from .stages import RunResult, run

__all__ = ["RunResult", "as_recipe", "check_model_shapes", "eval_suite", "quantize", "run", "scheme_label", "validate"]
