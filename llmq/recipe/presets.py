"""Named things a recipe may refer to: scheme presets, bitsandbytes formats, method names and the keys that belong
to one method. Data only, so every layer can import them."""

from __future__ import annotations

from typing import Any

# Presets follow llm-compressor's names: weight bits / activation bits; grouped presets use group 128.
PRESETS: dict[str, dict[str, Any]] = {
    "W8A16": {"bits": 8, "group_size": None, "symmetric": True},
    "W4A16": {"bits": 4, "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"bits": 4, "group_size": 128, "symmetric": False},
    "W3A16": {"bits": 3, "group_size": 128, "symmetric": True},
    "W2A16": {"bits": 2, "group_size": 64, "symmetric": False},
    # bitsandbytes formats, saved in bitsandbytes' serialization (plain transformers loads them)
    "NF4": {"format": "nf4", "bits": 4, "group_size": 64, "symmetric": True},
    "FP4": {"format": "fp4", "bits": 4, "group_size": 64, "symmetric": True},
    "LLM_INT8": {"format": "int8", "bits": 8, "group_size": None, "symmetric": True},
}
# What each bitsandbytes format fixes: 4-bit codebooks in blocks of 64 (the block size transformers uses),
# LLM.int8 per output row; and the methods that can produce it.
BNB_FORMATS: dict[str, dict[str, Any]] = {
    "nf4": {"bits": 4, "group_size": 64, "symmetric": True, "methods": ("rtn", "gptq")},
    "fp4": {"bits": 4, "group_size": 64, "symmetric": True, "methods": ("rtn", "gptq")},
    "int8": {"bits": 8, "group_size": None, "symmetric": True, "methods": ("rtn",)},
}

# The methods, by name (methods/__init__.py registers one implementation per name; a test holds them equal).
METHOD_NAMES = ("rtn", "gptq", "qat")
# The method keys that belong to one method (an error elsewhere); model cards list them.
GPTQ_KEYS = ("damp", "block_size", "act_order", "static_groups", "true_sequential", "clip_weights")
QAT_KEYS = ("init", "train_weights", "learn_scales", "learn_zero_points", "mode")
# QAT's block-wise mode only (method: {name: qat, mode: blockwise}).
BLOCKWISE_KEYS = ("block_epochs", "block_minutes", "block_lr", "block_qparam_lr")
