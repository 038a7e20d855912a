"""What a run leaves behind for people: report.json (schema in README, "report.json"), a Hugging Face model
card README.md, and a table for the terminal. Written from the numbers the run measured, nothing else.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from rich.table import Table

from . import models
from .recipe import GPTQ_KEYS

REPORT_VERSION = 1


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build(
    result, quantized_layers: list[str], layer_rows: list[dict[str, Any]] | None = None, quantization: dict | None = None
) -> dict[str, Any]:
    from . import __version__

    recipe = result.recipe
    base_bytes, quant_bytes = _size(result.base_dir), _size(result.output_dir)
    metrics = dict(result.metrics)
    if "base" in metrics and "quantized" in metrics:
        b, q = metrics["base"]["ppl"], metrics["quantized"]["ppl"]
        metrics["ppl_increase"] = q - b
        metrics["ppl_increase_rel"] = q / b - 1
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
        "model": {"spec": recipe.model, "resolved": str(result.base_dir), **models.card_metadata(recipe.model, result.base_dir)},
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
        "layers": layer_rows or [],
    }


def write(
    result, quantized_layers: list[str], layer_rows: list[dict[str, Any]] | None = None, quantization: dict | None = None
) -> dict[str, Any]:
    report = build(result, quantized_layers, layer_rows, quantization)
    out = Path(result.output_dir)
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "README.md", model_card(report))
    return report


def _ppl_line(name: str, m: dict) -> str:
    return f"| {name} | {m['ppl']:.3f} | {m['corpus']} | {m['seqlen']} | {m['windows']} | {m['tokens']} |"


def model_card(report: dict[str, Any]) -> str:
    """A Hugging Face model card: metadata header, how the model was made, what it measured."""
    r = report["recipe"]
    s = r["scheme"]
    group = "per-channel" if s["group_size"] is None else f"group size {s['group_size']}"
    header = {
        "base_model": report["model"]["base_model"],
        **({"license": report["model"]["license"]} if "license" in report["model"] else {}),
        "library_name": "transformers",
        "tags": ["llmq", "quantized", f"{s['bits']}-bit", r["method"]["name"]],
        "quantization": {
            "method": r["method"]["name"],
            "bits": s["bits"],
            "group_size": s["group_size"],
            "symmetric": s["symmetric"],
            "clip": r["method"]["clip"],
            **({k: r["method"][k] for k in GPTQ_KEYS} if r["method"]["name"] == "gptq" else {}),
        },
    }
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {r['model']} — {s['bits']}-bit {r['method']['name'].upper()} ({group}, {'symmetric' if s['symmetric'] else 'asymmetric'})",
        "",
        f"Quantized with llmq {report['llmq_version']} from `{r['model']}`. Linear layers matching {r['targets']} "
        f"and not {r['ignore']} ({report['quantized_layers']} layers) store {s['bits']}-bit integer weights with "
        f"per-group scales and zero points (llmq format; load with `import llmq` before `from_pretrained`).",
        "",
        *_calibration_lines(r),
        "## Evaluation",
        "",
    ]
    m = report["metrics"]
    if m:
        lines += [
            "Perplexity: non-overlapping windows, exp(mean NLL) over every predicted token (llmq protocol; not lm-eval's word perplexity).",
            "",
            "| model | perplexity | corpus | seqlen | windows | predicted tokens |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("base", "quantized"):
            if name in m:
                lines.append(_ppl_line(name, m[name]))
        if "ppl_increase" in m:
            lines += ["", f"Perplexity increase: {m['ppl_increase']:+.3f} ({m['ppl_increase_rel']:+.2%})."]
    else:
        lines.append("No evaluation was run.")
    sz = report["sizes"]
    lines += [
        "",
        "## Size",
        "",
        f"safetensors: {sz['quantized_bytes'] / 1e6:.1f} MB (base {sz['base_bytes'] / 1e6:.1f} MB"
        + (f", {sz['ratio']:.1%} of it)." if sz["ratio"] else ")."),
        "",
        "## Reproduce",
        "",
        "```bash",
        "llmq run recipe.yaml   # recipe.yaml sits beside these weights",
        "```",
        "",
        f"Recipe hash `{report['recipe_hash']}`; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}.",
        "",
    ]
    return "\n".join(lines)


def _calibration_lines(r: dict[str, Any]) -> list[str]:
    if r["method"]["name"] != "gptq":
        return []
    c, m = r["calibration"], r["method"]
    opts = ", ".join(f"{k}={m[k]}" for k in GPTQ_KEYS)
    return [
        f"Calibration: {c['n_samples']} windows x {c['seqlen']} tokens ({c['n_samples'] * c['seqlen']} tokens) of "
        f"`{c['data']}`, drawn with seed {c['seed']}; never the evaluation text. GPTQ options: {opts}; clipping "
        f"{m['clip']}" + (f" (norm {m['clip_norm']}, up to {m['clip_max_shrink']:.0%} shrink, {m['clip_grid']} steps)." if m["clip"] == "mse" else "."),
        "",
    ]


def table(result) -> Table:
    t = Table(title=f"llmq run: {result.recipe.name}", show_lines=False)
    for col in ("model", "perplexity", "windows x seqlen", "tokens", "size MB", "eval s"):
        t.add_column(col, justify="right" if col != "model" else "left")
    sizes = result.report.get("sizes", {})
    rows = {"base": sizes.get("base_bytes"), "quantized": sizes.get("quantized_bytes")}
    for name, nbytes in rows.items():
        m = result.metrics.get(name)
        if m is None:
            t.add_row(name, "-", "-", "-", f"{nbytes / 1e6:.1f}" if nbytes else "-", "-")
            continue
        t.add_row(name, f"{m['ppl']:.3f}", f"{m['windows']} x {m['seqlen']}", str(m["tokens"]),
                  f"{nbytes / 1e6:.1f}" if nbytes else "-", f"{m['seconds']:.1f}")
    return t
