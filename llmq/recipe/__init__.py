"""The recipe: one YAML file that says what llmq should do, validated before any heavy work starts.

`schema.py` holds the sections and their rules (`scheme.py` the scheme section: overrides, size budget, embedding), `presets.py` the named presets, formats and method names,
`targets.py` which layers a recipe selects and the checks that need their shapes, `messages.py` the one-line
errors. Everything a caller needs is importable from here.
"""

from .messages import first_error, load_json, load_yaml
from .presets import BLOCKWISE_KEYS, BNB_FORMATS, GPTQ_KEYS, METHOD_NAMES, PRESETS, QAT_KEYS
from .schema import (
    BudgetConfig,
    CalibrationConfig,
    EvalConfig,
    MethodConfig,
    OutputConfig,
    PerplexityConfig,
    Recipe,
    SchemeConfig,
    Strict,
    Thresholds,
    TrainingConfig,
)
from .targets import check_against_layers, is_targeted

__all__ = [
    "BLOCKWISE_KEYS", "BNB_FORMATS", "GPTQ_KEYS", "METHOD_NAMES", "PRESETS", "QAT_KEYS", "BudgetConfig", "CalibrationConfig",
    "EvalConfig", "MethodConfig", "OutputConfig", "PerplexityConfig", "Recipe", "SchemeConfig", "Strict", "Thresholds",
    "TrainingConfig", "check_against_layers", "first_error", "is_targeted", "load_json", "load_yaml",
]
