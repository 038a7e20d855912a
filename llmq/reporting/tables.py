"""What `llmq run` and `llmq eval` show in the terminal: one line per quantized layer as the walk goes, the run's
summary table, and a checkpoint's suite results."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rich.table import Table

logger = logging.getLogger("llmq.run")


def layer_printer() -> Callable[[dict[str, Any]], None]:
    """A row callback that logs one aligned line per quantized layer (block, layer, method, loss, damp, seconds)."""
    header = [False]

    def show(row: dict[str, Any]) -> None:
        if not header[0]:
            logger.info(f"{'block':>5}  {'layer':<24} {'method':<8} {'loss / weight mse':>18} {'damp':>7} {'seconds':>8}")
            header[0] = True
        err = row.get("loss", row.get("weight_mse"))
        damp = f"{row['damp']:.3g}" if "damp" in row else "-"
        logger.info(f"{row['block']:>5}  {row['layer']:<24} {row['method'][:8]:<8} {err:>18.5g} {damp:>7} {row['seconds']:>8.2f}")

    return show


def run_table(result) -> Table:
    """The terminal summary of `llmq run`: base, QAT's starting point and quantized, side by side."""
    t = Table(title=f"llmq run: {result.recipe.name}", show_lines=False)
    for col in ("model", "perplexity", "windows x seqlen", "tokens", "size MB", "eval s"):
        t.add_column(col, justify="right" if col != "model" else "left")
    sizes = result.report.get("sizes", {})
    rows = {"base": sizes.get("base_bytes"), "init": None, "quantized": sizes.get("quantized_bytes")}
    for name, nbytes in rows.items():
        m = result.metrics.get(name)
        if m is None and name == "init":
            continue
        if m is None:
            t.add_row(name, "-", "-", "-", f"{nbytes / 1e6:.1f}" if nbytes else "-", "-")
            continue
        t.add_row(name, f"{m['ppl']:.3f}", f"{m['windows']} x {m['seqlen']}", str(m["tokens"]),
                  f"{nbytes / 1e6:.1f}" if nbytes else "-", f"{m['seconds']:.1f}")
    return t


def results_table(run) -> Table:
    """One checkpoint's suite results (an evaluation.suite_run.SuiteRun) for the terminal."""
    t = Table(title=f"llmq eval: {run.model['name']} ({run.model.get('label', '')}), suite {run.suite}")
    for col in ("task", "shots", "docs", "metric", "score ± stderr", "seconds", "source"):
        t.add_column(col, justify="left" if col in ("task", "metric", "source") else "right")
    for r in run.records:
        metric = r["metric"]
        value = f"{r['metrics'][metric]:.4f}" if metric != "ppl" else f"{r['metrics']['ppl']:.3f}"
        stderr = r["metrics"].get(f"{metric}_stderr")
        t.add_row(r["label"], str(r["shots"]), str(r["samples"]), metric if metric != "ppl" else "ppl (protocol)",
                  value + (f" ± {stderr:.4f}" if stderr is not None else ""), f"{r['seconds']:.1f}",
                  "store" if r["label"] in run.served else "evaluated")
    return t


def budget_table(record: dict[str, Any]) -> Table:
    """The schemes a budget chose (quantization.budget.choose's record): one row per decoder block (or layer outside
    the blocks), one column per layer name inside a block, and the budget met in the title."""
    layers: dict[str, str] = record["layers"]
    rows: dict[str, dict[str, str]] = {}
    for name, scheme in layers.items():
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        row, col = (".".join(parts[: at + 1]), ".".join(parts[at + 1:])) if at is not None else (name, "")
        rows.setdefault(row, {})[col] = scheme
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    counts = ", ".join(f"{k} x{v}" for k, v in record["counts"].items() if v)
    emb = record.get("embedding")
    table = f"; embedding {emb['chosen']}" if emb else ""
    t = Table(title=f"schemes chosen: {record['used']} of {record['allowed']} ({counts}{table})")
    t.add_column("block")
    for c in cols:
        t.add_column(c.rsplit(".", 1)[-1] or "layer")
    for row, by_col in rows.items():
        t.add_row(row, *(by_col.get(c, "") for c in cols))
    return t
