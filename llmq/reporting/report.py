"""report.json (schema in README, "report.json") and, beside it, the model card (cards.py): what a run leaves
behind, written from the numbers the run measured, nothing else.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from ..checkpoint.safetensors_io import weights_bytes
from ..io import write_text_atomic
from ..model.resolve import card_metadata
from ..version import __version__
from .cards import model_card

REPORT_VERSION = 2


def build(
    result, quantized_layers: list[str], layer_rows: list[dict[str, Any]] | None = None, quantization: dict | None = None,
    command: str | None = None, gate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    recipe = result.recipe
    base_bytes, quant_bytes = weights_bytes(result.base_dir), weights_bytes(result.output_dir)
    metrics = dict(result.metrics)
    if "base" in metrics and "quantized" in metrics:
        b, q = metrics["base"]["ppl"], metrics["quantized"]["ppl"]
        metrics["ppl_increase"] = q - b
        metrics["ppl_increase_rel"] = q / b - 1
        if "init" in metrics and metrics["init"]["ppl"] != b:
            metrics["qat_recovery"] = (metrics["init"]["ppl"] - q) / (metrics["init"]["ppl"] - b)
    return {
        "report_version": REPORT_VERSION,
        "llmq_version": __version__,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
        },
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe.hash(),
        "command": command or "llmq run recipe.yaml",
        "model": {"spec": recipe.model, "resolved": str(result.base_dir), **card_metadata(recipe.model, result.base_dir)},
        "output_dir": str(result.output_dir),
        "quantized_layers": len(quantized_layers),
        "sizes": {
            "base_bytes": base_bytes,
            "quantized_bytes": quant_bytes,
            "ratio": quant_bytes / base_bytes if base_bytes else None,
        },
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "metrics": metrics,
        "quantization": quantization or {},
        **({"gate": gate} if gate is not None else {}),
        "layers": layer_rows or [],
    }


def write(
    result, quantized_layers: list[str], layer_rows: list[dict[str, Any]] | None = None, quantization: dict | None = None,
    command: str | None = None, gate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    report = build(result, quantized_layers, layer_rows, quantization, command, gate)
    out = Path(result.output_dir)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "README.md", model_card(report))
    return report
