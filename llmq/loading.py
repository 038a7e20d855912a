"""Load a checkpoint as a model to run or evaluate: `llmq.load` and what every llmq command loads with.

llmq and full-precision checkpoints load through `from_pretrained` (llmq registered, so QuantLinear layers are
built and checked); GPTQ and compressed-tensors checkpoints are imported once into a cached llmq copy and loaded
from there; bitsandbytes checkpoints load on bitsandbytes' own modules for evaluation; anything else is refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import formats
from .checkpoint.hf import check_loaded
from .environment import default_device
from .errors import BadInputError


def load_model(folder: str | Path, dtype: torch.dtype | str = "auto", bitsandbytes: bool = False):
    """from_pretrained with llmq registered, in eval mode; refuses models loaded without their quantizer.

    A GPTQ or compressed-tensors checkpoint is imported once into an llmq copy in the cache and loaded from
    there, so it runs on llmq's QuantLinear layers; with `bitsandbytes` (evaluation), a bitsandbytes checkpoint
    loads on bitsandbytes' own modules; any other quantized format is refused with a message."""
    from transformers import AutoModelForCausalLM

    found = formats.detect(folder)
    if found.kind == "bitsandbytes" and bitsandbytes:
        return _load_bitsandbytes(folder)
    if found.importable:
        folder = formats.imported_copy(folder)
    elif found.kind not in ("llmq", "full-precision"):
        raise BadInputError(formats.unsupported_message(folder, found, "loads"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    check_loaded(model)
    return model.eval()


def _load_bitsandbytes(folder: str | Path):
    """A bitsandbytes checkpoint as transformers loads it (its own Linear4bit / Linear8bitLt modules), for evaluation;
    refused when bitsandbytes is missing rather than loaded as random Linear weights."""
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInputError(f"{folder} is a bitsandbytes checkpoint: loading it needs the package bitsandbytes (pip install bitsandbytes)")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=default_device().type)
    if not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        raise BadInputError(f"{folder}: its config says bitsandbytes but no bitsandbytes layer was built; refusing random weights")
    return model.eval()


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
