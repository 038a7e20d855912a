"""Model cards (README.md with the Hugging Face metadata header): how a model was made, what it measured, how to
redo it — for a checkpoint `llmq run` made (from its report.json), one `llmq export` wrote, and one `llmq import`
brought in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..describe import scheme_words
from ..evaluation.scores import recovery
from ..recipe import GPTQ_KEYS, QAT_KEYS

PROTOCOL = (
    "Perplexity protocol: the corpus joined once and tokenized once, cut into non-overlapping windows of `seqlen` "
    "tokens, exp(mean NLL) over every predicted token (`seqlen - 1` per window). Not lm-eval's word perplexity."
)


def _ppl_line(name: str, m: dict) -> str:
    return f"| {name} | {m['ppl']:.3f} | {m['corpus']} | {m['seqlen']} | {m['windows']} | {m['tokens']} |"


def _scheme_words(s: dict[str, Any]) -> str:
    return scheme_words(s["bits"], s["group_size"], s["symmetric"], s.get("format", "int"))


def _storage_sentence(s: dict[str, Any]) -> str:
    """How the quantized layers are stored and what loads them."""
    fmt = s.get("format", "int")
    if fmt in ("nf4", "fp4"):
        return (f"store {fmt.upper()} codes (4-bit, a scale per block of 64 weights) in bitsandbytes' own serialization: "
                "plain transformers loads it with bitsandbytes installed (`from_pretrained(\"FOLDER\")`), no llmq import.")
    if fmt == "int8":
        return ("store LLM.int8 weights (int8, a scale per row) in bitsandbytes' own serialization: plain transformers "
                "loads it with bitsandbytes installed (`from_pretrained(\"FOLDER\")`), no llmq import.")
    emb = s.get("embedding")
    table = ""
    if emb:  # the recipe as saved: a short name or the mapping
        e = emb if isinstance(emb, dict) else {}
        words = scheme_words(e["bits"], e["group_size"], e["symmetric"], short=True) if e else str(emb)
        table = (f" The token embedding is stored {words} too (and the output projection, when the model ties it to "
                 "the embedding, reads the same quantized table).")
    return (f"store {s['bits']}-bit integer weights with per-group scales and zero points (llmq format; load with "
            f"`import llmq` before `from_pretrained`).{table}")


def _header(report: dict[str, Any], tags: list[str], extra: dict[str, Any] | None = None) -> list[str]:
    """The model card's YAML metadata block (what the Hugging Face hub indexes)."""
    r, s = report["recipe"], report["recipe"]["scheme"]
    header = {
        "base_model": report["model"]["base_model"],
        **({"license": report["model"]["license"]} if "license" in report["model"] else {}),
        "library_name": "transformers",
        "tags": ["llmq", "quantized", f"{s['bits']}-bit", r["method"]["name"],
                 *(["bitsandbytes", s["format"]] if s.get("format", "int") != "int" else []), *tags],
        "quantization": {
            "tool": f"llmq {report['llmq_version']}",
            "method": r["method"]["name"],
            "bits": s["bits"],
            "group_size": s["group_size"],
            "symmetric": s["symmetric"],
            **({"format": s["format"]} if s.get("format", "int") != "int" else {}),
            "clip": r["method"]["clip"],
            **({"gguf_grid": True} if r["method"].get("gguf_grid") else {}),  # scales on llama.cpp's grids
            **({k: r["method"][k] for k in GPTQ_KEYS} if _uses_gptq(r["method"]) else {}),
            **({k: r["method"].get(k) for k in QAT_KEYS} if r["method"]["name"] == "qat" else {}),
            **(extra or {}),
        },
    }
    return ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", ""]


def _evaluation_lines(report: dict[str, Any]) -> list[str]:
    m = report["metrics"]
    if not m:
        return ["No evaluation was run."]
    lines = [PROTOCOL, "", "| model | perplexity | corpus | seqlen | windows | predicted tokens |", "|---|---|---|---|---|---|"]
    names = {"base": "base", "init": f"init ({report['recipe']['method']['init']}, before QAT)", "quantized": "quantized"}
    lines += [_ppl_line(label, m[name]) for name, label in names.items() if name in m]
    if "ppl_increase" in m:
        lines += ["", f"Perplexity increase: {m['ppl_increase']:+.3f} ({m['ppl_increase_rel']:+.2%})."]
    if "qat_recovery" in m:
        lines += [f"QAT recovered {m['qat_recovery']:.1%} of what the initial quantization lost: "
                  "(ppl_init - ppl_qat) / (ppl_init - ppl_base)."]
    return lines + _task_lines(m.get("tasks")) + _gate_lines(report.get("gate"))


def _task_lines(tasks: dict[str, Any] | None) -> list[str]:
    """The suite's tasks, base against quantized, with standard errors and recovery (quantized / base)."""
    if not tasks or "quantized" not in tasks:
        return []
    base, quant = tasks.get("base", {}), tasks["quantized"]
    lines = ["", f"Tasks (lm-eval, suite `{tasks['suite']}`; results store `{tasks['store']}`):", "",
             "| task | shots | documents | metric | base | quantized | recovery |", "|---|---|---|---|---|---|---|"]
    for label, q in quant.items():
        metric, b = q["metric"], base.get(label)
        rec = recovery(metric, b["metrics"][metric], q["metrics"][metric]) if b else None
        lines.append(f"| {label} | {q['shots']} | {q['samples']} | {metric} | {_score(b, metric) if b else '-'} | "
                     f"{_score(q, metric)} | {'-' if rec is None else f'{rec:.1%}'} |")
    return lines


def _score(record: dict[str, Any], metric: str) -> str:
    value, stderr = record["metrics"][metric], record["metrics"].get(f"{metric}_stderr")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _gate_lines(gate: dict[str, Any] | None) -> list[str]:
    if gate is None:
        return []
    if gate["passed"]:
        return ["", f"Regression gate: passed ({json.dumps(gate['thresholds'])})."]
    return ["", "Regression gate: **failed**:", "", *[f"- {miss}" for miss in gate["misses"]]]


def _size_lines(report: dict[str, Any]) -> list[str]:
    sz = report["sizes"]
    return [
        f"safetensors: {sz['quantized_bytes'] / 1e6:.1f} MB (base {sz['base_bytes'] / 1e6:.1f} MB"
        + (f", {sz['ratio']:.1%} of it)." if sz["ratio"] else ")."),
    ]


def _reproduce_lines(report: dict[str, Any], then: str | None = None) -> list[str]:
    return [
        "## Reproduce",
        "",
        "```bash",
        f"pip install llmq=={report['llmq_version']}",
        f"{report.get('command', 'llmq run recipe.yaml')}   # recipe.yaml sits beside these weights",
        *([then] if then else []),
        "```",
        "",
        f"Recipe hash `{report['recipe_hash']}`; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, Python {report['versions']['python']}.",
        "",
    ]


def model_card(report: dict[str, Any]) -> str:
    """A Hugging Face model card: metadata header, how the model was made, what it measured, how to redo it."""
    r = report["recipe"]
    s = r["scheme"]
    lines = [
        *_header(report, tags=[]),
        f"# {r['model']} — {_bits_title(report)} {r['method']['name'].upper()} ({_scheme_words(s)})",
        "",
        f"Quantized with llmq {report['llmq_version']} from `{report['model']['base_model']}`. Linear layers matching "
        f"{r['targets']} and not {r['ignore']} ({report['quantized_layers']} layers) {_storage_sentence(s)}",
        "",
        *_calibration_lines(r),
        *_mixed_lines(report),
        *_training_lines(report),
        "## Evaluation",
        "",
        *_evaluation_lines(report),
        "",
        "## Size",
        "",
        *_size_lines(report),
        "",
        *_reproduce_lines(report),
    ]
    return "\n".join(lines)


LOADERS = {
    "gptq": [
        "Served by vLLM and SGLang (`vllm serve FOLDER`); transformers loads it through optimum + gptqmodel:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM   # pip install optimum gptqmodel",
        'model = AutoModelForCausalLM.from_pretrained("FOLDER")',
        "```",
    ],
    "compressed-tensors": [
        "Served by vLLM and SGLang (`vllm serve FOLDER`); the compressed-tensors package reads and decompresses it, and "
        "transformers loads it with compressed-tensors installed (`from_pretrained(\"FOLDER\")`) for symmetric schemes "
        "(transformers 5.23 with compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints at all, "
        "including llm-compressor's own).",
    ],
}


def export_card(src: Path, label: str, quantization_config: dict[str, Any]) -> str:
    """The card of an exported checkpoint: the llmq checkpoint's provenance and numbers, plus how to load this format."""
    fmt = quantization_config["quant_method"]
    report_path = Path(src) / "report.json"
    how = [line.replace("FOLDER", "path/to/this/folder") for line in LOADERS[fmt]]
    if quantization_config.get("dynamic"):  # per-layer schemes: the loaders that read GPTQModel's overrides
        how = ["Its layers differ in scheme (GPTQModel `dynamic` overrides): load it with GPTQModel "
               "(`GPTQModel.load(\"FOLDER\")`). transformers' own GPTQ loader (optimum) ignores the overrides, and "
               "vLLM's fused q/k/v and gate/up layers do not match per-projection overrides: for those, use llmq's "
               "compressed-tensors export of the same checkpoint.".replace("FOLDER", "path/to/this/folder")]
    report = _saved_report(report_path)
    if report is not None:
        try:
            return _export_card_from(report, fmt, label, quantization_config, how)
        except (KeyError, TypeError, AttributeError):  # a report.json from elsewhere, or damaged: no provenance
            pass
    return "\n".join([f"# {Path(src).name} as {label}", "", f"Exported by llmq from the llmq checkpoint `{Path(src).name}` "
                      "(it has no readable report.json, so its provenance is unknown).", "", "## Loading", "", *how, ""])


def _export_card_from(report: dict[str, Any], fmt: str, label: str, quantization_config: dict[str, Any],
                      how: list[str]) -> str:
    r, s = report["recipe"], report["recipe"]["scheme"]
    export_cmd = f"llmq export {report['output_dir']} OUT --format {fmt}" + (
        " --gptq-version 2" if quantization_config.get("checkpoint_format") == "gptq_v2" else "")
    lines = [
        *_header(report, tags=[fmt], extra={"format": label}),
        f"# {r['model']} — {_bits_title(report)} {r['method']['name'].upper()} ({_scheme_words(s)}), {label}",
        "",
        f"Quantized with llmq {report['llmq_version']} from `{report['model']['base_model']}` and exported to {label} "
        f"({report['quantized_layers']} quantized Linear layers). The integer codes, scales and zero points are exactly "
        "those of the llmq checkpoint; only their packing differs.",
        "",
        "## Loading",
        "",
        *how,
        "",
        *_calibration_lines(r),
        "## Evaluation",
        "",
        "Measured by llmq on the llmq checkpoint this was exported from (same integers; llmq's tests check that "
        "this format's own loaders give the same logits within fp16 rounding).",
        "",
        *_evaluation_lines(report),
        "",
        *_reproduce_lines(report, then=export_cmd),
    ]
    return "\n".join(lines)


def _saved_report(path: Path) -> dict[str, Any] | None:
    """A checkpoint's report.json when it is one llmq wrote (a JSON object with a recipe), else None."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    ok = isinstance(report, dict) and isinstance(report.get("recipe"), dict) and report.get("report_version") is not None
    return report if ok else None


def import_card(src: Path, found) -> str:
    """The card of a checkpoint imported into llmq: where it came from; llmq did not make it."""
    return "\n".join([
        "---",
        yaml.safe_dump({"library_name": "transformers", "tags": ["llmq", "quantized", found.kind]}, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {Path(src).name}, imported into llmq",
        "",
        f"`{Path(src)}` is {found.label}. `llmq import` rewrote its packed weights in the llmq layout (same integer codes, "
        "scales and zero points) so that llmq's kernels and evaluation run on it; load with `import llmq` before "
        "`from_pretrained`. llmq did not quantize it: see the original model card for how it was made.",
        "",
    ])


def _training_lines(report: dict[str, Any]) -> list[str]:
    r, qat = report["recipe"], report["quantization"].get("qat")
    if r["method"]["name"] == "qat" and r["method"].get("mode") == "blockwise":
        return _blockwise_lines(r)
    if qat is None:
        return []
    t, m, stats = r["training"], r["method"], qat["training"]
    learns = [w for w, on in (("the weights", m["train_weights"]), ("the scales", m["learn_scales"]),
                              ("the zero points", m["learn_zero_points"] and not r["scheme"]["symmetric"])) if on]
    loss = f"distillation from the base model (KL at temperature {t['kd_temperature']})" if t["loss"] == "kd" else "next-token cross-entropy"
    return [
        "## Quantization-aware training",
        "",
        f"Started from {m['init']} ({qat['init_seconds']:.0f} s), then trained {', '.join(learns)} of the quantized layers "
        f"through their fake-quantized forward for {stats['steps']} steps x {stats['batch_tokens']:,} tokens "
        f"({stats['tokens']:,} tokens of `{t['data']}`, never the evaluation text) on {stats['processes']} process(es); "
        f"loss: {loss}; AdamW, lr {t['lr']:g} (weights) / {t['qparam_lr']:g} (scales, zero points), "
        f"{t['warmup']:.0%} warm-up then cosine. Final training loss {stats['losses'][-1]:.4f} "
        f"(first step {stats['losses'][0]:.4f}). Layers that are not quantized keep the base model's values.",
        "",
    ]


def _blockwise_lines(r: dict[str, Any]) -> list[str]:
    m = r["method"]
    trains = [f"the scales (Adam, lr {m['block_qparam_lr']:g} in log space)"] if m["learn_scales"] else []
    if m["train_weights"] and m["block_lr"] > 0:
        trains.append(f"a rounding offset per weight (lr {m['block_lr']:g} grid steps)")
    length = (f"a budget of {m['block_minutes']:g} minutes for the whole method" if m.get("block_minutes")
              else f"{m['block_epochs']} passes over the calibration batches")
    return [
        "## Quantization-aware training, block by block",
        "",
        f"Each decoder block started from {m['init']}; then {' and '.join(trains) or 'nothing'} trained ({length}) "
        "so that the block's output on the quantized model's activations reproduces the full-precision model's "
        "output of that block (mean squared error on the calibration windows); the integer zero points stayed as "
        f"{m['init']} chose them, and the next block was fed this block's quantized output. The per-layer table in "
        "report.json has each block's output error before (`init_loss`) and after (`loss`) training, and its steps.",
        "",
    ]


def _bits_title(report: dict[str, Any]) -> str:
    s = report["recipe"]["scheme"]
    if report.get("quantization", {}).get("budget") or any(not o.get("skip") for o in report["recipe"].get("overrides") or []):
        return f"mixed-precision (default {s['bits']}-bit)"
    return f"{s['bits']}-bit"


def _mixed_lines(report: dict[str, Any]) -> list[str]:
    """Per-layer schemes: the budget they were chosen to (and what it met), or the recipe's overrides."""
    budget = report.get("quantization", {}).get("budget")
    overrides = report["recipe"].get("overrides") or []
    if budget is None and not overrides:
        return []
    lines = ["## Per-layer schemes", ""]
    if budget is None:
        lines.append("The recipe's overrides (the first that matches a layer decides it; the others take the scheme above):")
        lines.append("")
        for o in overrides:
            what = "kept in full precision" if o.get("skip") else ", ".join(
                f"{k}: {o[k]}" for k in ("bits", "group_size", "symmetric") if o.get(k, "inherit") not in (None, "inherit"))
            lines.append(f"- `{'`, `'.join(o['targets'])}` → {what}")
        return [*lines, ""]
    goal = ", ".join(f"{k}: {v}" for k, v in budget["budget"].items() if v is not None and k != "sensitivity_samples")
    lines += [f"Each layer's scheme was chosen by llmq to a budget ({goal}): it uses {budget['used']} of {budget['allowed']}. "
              f"Candidates: {', '.join(budget['candidates'])}; the choice minimises the summed measured sensitivity "
              "(each layer's block-output error under each candidate, on calibration windows) under the budget.", "",
              "| scheme | layers |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in budget["counts"].items() if v]
    if budget.get("embedding"):
        e = budget["embedding"]
        lines += ["", f"The budget chose the token embedding's scheme too (candidates: {', '.join(e['candidates'])}): "
                      f"{e['chosen']}."]
    return [*lines, "", "Every layer's scheme is in `config.json` (`quantization_config.layers`) and `recipe.yaml`.", ""]


def _uses_gptq(method: dict[str, Any]) -> bool:
    """GPTQ made the weights, or QAT's starting point (reports from before QAT have no `init` key)."""
    return method["name"] == "gptq" or (method["name"] == "qat" and method.get("init") == "gptq")


def _calibration_lines(r: dict[str, Any]) -> list[str]:
    if not _uses_gptq(r["method"]):
        return ["No calibration data: round-to-nearest reads the weights only.", ""]
    c, m = r["calibration"], r["method"]
    opts = ", ".join(f"{k}={m[k]}" for k in GPTQ_KEYS)
    return [
        "## Calibration",
        "",
        f"{c['n_samples']} windows x {c['seqlen']} tokens ({c['n_samples'] * c['seqlen']:,} tokens) of "
        f"`{c['data']}`, drawn with seed {c['seed']}; never the evaluation text. GPTQ options: {opts}; clipping "
        f"{m['clip']}" + (f" (norm {m['clip_norm']}, up to {m['clip_max_shrink']:.0%} shrink, {m['clip_grid']} steps)." if m["clip"] == "mse" else "."),
        "",
    ]
