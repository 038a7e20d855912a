"""What this process runs on and where llmq keeps things, decided in one place.

- `gpu_available()` / `default_device()`: CUDA when torch sees a GPU, else the CPU (every "where does this run" default).
- `DTYPES` / `dtype_of_config`: the floating dtypes llmq writes, by the names recipes and config.json use.
- `cache_dir()`: `$LLMQ_CACHE`, default `~/.cache/llmq` (converted GGUF models, imported checkpoints, the results
  store).
- `world_size()` / `is_main_process()`: the processes of a distributed launch (accelerate launch / torchrun).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def gpu_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """Where llmq runs when not told: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if gpu_available() else "cpu")


def dtype_of_config(config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint's config.json says its model is built in (float32 when it does not say)."""
    return DTYPES.get(dtype_name_of_config(config), torch.float32)


def output_dtype(name: str, base: torch.dtype) -> torch.dtype:
    """A recipe's output.dtype: the named one, or for `auto` the base model's own (`base`), so a bf16 model's
    embeddings and norms are written in bf16, not widened to fp32 (float32 when the base is not a float type)."""
    if name != "auto":
        return DTYPES[name]
    return base if base in DTYPES.values() else torch.float32


def folder_dtype(folder: str | Path) -> torch.dtype:
    """The dtype the checkpoint folder's config.json names (float32 when it names none)."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    return dtype_of_config(config) if isinstance(config, dict) else torch.float32


def dtype_name_of_config(config: dict[str, Any]) -> str:
    """config.json's `dtype` (or the older `torch_dtype`) as a plain name: 'float32', 'bfloat16', ..."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(name).removeprefix("torch.")


def cache_dir() -> Path:
    """Where llmq keeps what it makes once and reuses: $LLMQ_CACHE, default ~/.cache/llmq."""
    return Path(os.environ.get("LLMQ_CACHE", Path.home() / ".cache" / "llmq"))


def world_size() -> int:
    """How many processes a distributed launch (accelerate launch / torchrun) started; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """False only in the non-main processes of a distributed launch."""
    if world_size() <= 1:
        return True
    from accelerate import PartialState

    return PartialState(cpu=not gpu_available()).is_main_process
