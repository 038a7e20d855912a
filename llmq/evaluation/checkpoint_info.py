"""What a leaderboard row and a results-store record say about a checkpoint: name, kind, method, scheme, weight bits,
size on disk, base model, the method's seconds — read from its config.json (and recipe.yaml / report.json for llmq
checkpoints), no weights loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import formats
from ..checkpoint.safetensors_io import tensor_bytes, weights_bytes
from ..describe import scheme_words
from ..environment import DTYPES, dtype_name_of_config
from ..formats.convert import linear_shapes
from ..model.structure import skeleton


def describe_checkpoint(spec: str, folder: Path, name: str | None = None, base: str | None = None) -> dict[str, Any]:
    """What a leaderboard row says about a checkpoint: name, kind, method, scheme, weight bits, size on disk, base."""
    found = formats.detect(folder)
    qc = found.quantization_config
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = dtype_name_of_config(config)
    local = Path(spec).expanduser().exists()
    info: dict[str, Any] = {"name": name or (folder.name if local else spec), "kind": found.kind,
                            "label": found.label, "base": base}
    if found.kind == "full-precision":
        info.update(method="base", scheme=dtype, bits=8 * DTYPES.get(dtype, torch.float32).itemsize)
    elif found.kind == "llmq":
        recipe_file = folder / "recipe.yaml"
        method = "llmq"
        recipe = _saved_recipe(recipe_file) if recipe_file.is_file() else {}
        if recipe:
            method_section = recipe.get("method")
            if isinstance(method_section, str):
                method = method_section
            elif isinstance(method_section, dict):
                method = str(method_section.get("name", method))
            info["base"] = base or (recipe.get("model") if isinstance(recipe.get("model"), str) else None)
        info.update(method=method, bits=qc.get("bits"),
                    scheme=scheme_words(qc.get("bits"), qc.get("group_size"), qc.get("sym"), short=True))
        if qc.get("layers"):  # per-layer schemes: the weight bits actually stored, on average
            info.update(bits=round(stored_bits_per_weight(folder), 3), scheme=f"mixed (default {info['scheme']})")
        seconds = _method_seconds(folder / "report.json")
        if seconds is not None:  # what making it cost: the method's wall clock (GPTQ, QAT training included)
            info["method_s"] = seconds
        emb = qc.get("embedding")
        if isinstance(emb, dict):  # bits stay the Linear layers'; the size column counts the smaller table
            info["scheme"] += f", embedding {scheme_words(emb.get('bits'), emb.get('group_size'), emb.get('sym'), short=True)}"
    elif found.kind == "bitsandbytes":
        fmt = qc.get("bnb_4bit_quant_type", "nf4") if qc.get("load_in_4bit") else "int8"
        info.update(method="bitsandbytes", scheme=fmt, bits=4 if qc.get("load_in_4bit") else 8)
    elif found.kind == "compressed-tensors":
        weights, _ = formats.ct_weight_args(qc)
        info.update(method=found.kind, scheme=found.label, bits=(weights or {}).get("num_bits"))
    else:
        info.update(method=found.kind, scheme=found.label, bits=qc.get("bits"))
    info["size_bytes"] = weights_bytes(folder)
    return info


def stored_bits_per_weight(folder: Path) -> float:
    """Bits per weight of an llmq checkpoint's quantized layers as stored: codes, scales, zero points and g_idx over
    the layers' out x in weights (what a budget's bits_per_weight counts; a quantized embedding is not a Linear layer
    and is not counted)."""
    sizes = tensor_bytes(folder)
    shapes = linear_shapes(skeleton(folder))
    layers = [n for n in (k.removesuffix(".qweight") for k in sizes if k.endswith(".qweight")) if n in shapes]
    stored = sum(sizes.get(f"{n}.{leaf}", 0) for n in layers for leaf in ("qweight", "scales", "qzeros", "g_idx"))
    return 8 * stored / sum(shapes[n].in_features * shapes[n].out_features for n in layers)


def _method_seconds(path: Path) -> float | None:
    """report.json's `timings.quantize_s` (the method's wall clock: calibration, GPTQ, QAT training), or None."""
    try:
        seconds = json.loads(path.read_text(encoding="utf-8"))["timings"]["quantize_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return round(float(seconds), 1) if isinstance(seconds, (int, float)) else None


def _saved_recipe(path: Path) -> dict[str, Any]:
    """The recipe.yaml an llmq checkpoint carries, or {} when it is not a readable mapping (it only names things)."""
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, OSError):
        return {}
    return recipe if isinstance(recipe, dict) else {}

