"""The leaderboard: one suite's results from the results store as a Markdown table, a sortable HTML page and plots.

Why it exists: people choose a quantization by comparing rows, so every row must come from the same suite and
say the same things: method, scheme, weight bits, size on disk, the method's wall clock (accuracy against effort:
what PTQ-or-QAT users weigh), the perplexity protocol, every task with its
standard error, the average of the tasks' primary metrics and the recovery of that average against the row's base
model (quantized average / base average; the base is the full-precision row named by the quantized row's `base`).
The plots: wiki perplexity against weight bits, and average accuracy against size on disk with the Pareto front
(no other row is both smaller and more accurate).

Rows are built from the store alone (newest record per checkpoint and task), so the leaderboard can be redrawn
anywhere the store file is. The HTML page is one self-contained file: the rows are JSON, drawn and sorted by a
few lines of JavaScript (click a column header).

Deliberately not here: evaluating (evaluation/); the model card (cards.py).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..evaluation.scores import LOWER_IS_BETTER, recovery
from ..evaluation.store import ResultsStore
from ..io import write_text_atomic


@dataclass
class Row:
    checkpoint: str
    model: dict[str, Any]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> newest store record
    ppl: float | None = None
    average: float | None = None
    recovery: float | None = None

    @property
    def name(self) -> str:
        return self.model["name"]


@dataclass
class Built:
    files: list[Path]
    rows: int


def collect(records: list[dict[str, Any]], suite: str) -> tuple[list[Row], list[str]]:
    """Rows (one per checkpoint) and the task labels of `suite`, in first-seen order; averages and recovery filled."""
    rows: dict[str, Row] = {}
    labels: list[str] = []
    described = {r["checkpoint"]: r["model"] for r in records if "model" in r}  # the newest description wins
    for r in records:
        if r.get("suite") != suite:
            continue
        row = rows.setdefault(r["checkpoint"], Row(r["checkpoint"], described[r["checkpoint"]]))
        if r["task"].startswith("ppl:"):
            row.ppl = r["metrics"]["ppl"]
        else:
            row.tasks[r["label"]] = r
            if r["label"] not in labels:
                labels.append(r["label"])
    averaged = [label for label in labels if _metric(rows, label) not in LOWER_IS_BETTER]
    for row in rows.values():  # a row missing a task gets no average (rather than every row losing the task)
        if averaged and all(label in row.tasks for label in averaged):
            row.average = sum(_value(row.tasks[label]) for label in averaged) / len(averaged)
    bases = {row.name: row for row in rows.values() if row.model.get("method") == "base"}
    for row in rows.values():
        base = bases.get(row.model.get("base") or "") if row.model.get("method") != "base" else row
        if base is not None and base.average and row.average is not None:
            row.recovery = recovery("acc", base.average, row.average)
    ordered = sorted(rows.values(), key=lambda row: (row.model.get("method") != "base", -(row.average or 0)))
    return ordered, labels


def _metric(rows: dict[str, Row], label: str) -> str:
    return next(row.tasks[label]["metric"] for row in rows.values() if label in row.tasks)


def _value(record: dict[str, Any]) -> float:
    return record["metrics"][record["metric"]]


def _cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    m = record["metrics"]
    stderr = m.get(f"{record['metric']}_stderr")
    return f"{_value(record):.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _columns(labels: list[str], rows: list[Row]) -> list[str]:
    metrics = {label: next((r.tasks[label]["metric"] for r in rows if label in r.tasks), "") for label in labels}
    return ["model", "method", "scheme", "bits", "size MB", "method s", "wiki ppl", *[f"{k} ({v})" for k, v in metrics.items()],
            "average", "recovery"]


def _cells(row: Row, labels: list[str]) -> list[str]:
    m = row.model
    return [row.name, str(m.get("method") or "-"), str(m.get("scheme") or "-"), str(m.get("bits") or "-"),
            f"{m.get('size_bytes', 0) / 1e6:.1f}", "-" if m.get("method_s") is None else f"{m['method_s']:.0f}",
            "-" if row.ppl is None else f"{row.ppl:.3f}",
            *[_cell(row.tasks.get(label)) for label in labels],
            "-" if row.average is None else f"{row.average:.4f}", "-" if row.recovery is None else f"{row.recovery:.1%}"]


def markdown(rows: list[Row], labels: list[str], suite: str) -> str:
    cols = _columns(labels, rows)
    samples = {label: next(r.tasks[label]["samples"] for r in rows if label in r.tasks) for label in labels}
    shots = {label: next(r.tasks[label]["shots"] for r in rows if label in r.tasks) for label in labels}
    lines = [
        f"Suite `{suite}`: " + ", ".join(f"{label} {shots[label]}-shot ({samples[label]} docs)" for label in labels) + ".",
        ("Scores ± standard error; average = mean of the tasks' primary metrics (perplexities excluded); "
         "recovery = average / the base model's average. wiki ppl = the perplexity protocol (not lm-eval's word perplexity). "
         "method s = the quantization method's wall clock (report.json; GPTQ, QAT training included) where the checkpoint "
         "has it."),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, labels)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmq leaderboard: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; cursor: pointer; user-select: none; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.base td {{ font-weight: 600; }}
</style></head><body>
<h1>llmq leaderboard: suite <code>{title}</code></h1>
<p>{note}</p>
<table id="board"><thead><tr></tr></thead><tbody></tbody></table>
<p>{plots}</p>
<script id="data" type="application/json">{data}</script>
<script>
const board = JSON.parse(document.getElementById("data").textContent);
let sortCol = board.columns.length - 1, sortDesc = true;  // recovery, highest first
function key(v, i) {{
  if (!board.numeric[i]) return v.toLowerCase();
  const x = parseFloat(v); return isNaN(x) ? -Infinity : x;  // "-" (no value) sorts last
}}
function draw() {{
  const head = document.querySelector("#board thead tr"), body = document.querySelector("#board tbody");
  head.innerHTML = ""; body.innerHTML = "";
  board.columns.forEach((c, i) => {{
    const th = document.createElement("th");
    th.textContent = c + (i === sortCol ? (sortDesc ? " \\u25BC" : " \\u25B2") : "");
    th.onclick = () => {{ sortDesc = sortCol === i ? !sortDesc : true; sortCol = i; draw(); }};
    head.appendChild(th);
  }});
  const rows = board.rows.slice().sort((a, b) => {{
    const x = key(a.cells[sortCol], sortCol), y = key(b.cells[sortCol], sortCol);
    return (x < y ? -1 : x > y ? 1 : 0) * (sortDesc ? -1 : 1);
  }});
  rows.forEach(r => {{
    const tr = document.createElement("tr");
    if (r.base) tr.className = "base";
    r.cells.forEach(c => {{ const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }});
    body.appendChild(tr);
  }});
}}
draw();
</script></body></html>
"""


def page(rows: list[Row], labels: list[str], suite: str, plots: list[str]) -> str:
    columns = _columns(labels, rows)
    data = {"columns": columns, "numeric": [c not in ("model", "method", "scheme") for c in columns],
            "rows": [{"cells": _cells(row, labels), "base": row.model.get("method") == "base"} for row in rows]}
    note = ("Scores ± standard error. Average: mean of the tasks' primary metrics; recovery: average / the base "
            "model's average; wiki ppl: the perplexity protocol. Click a column to sort.")
    images = " ".join(f'<img src="{html.escape(p)}" alt="{html.escape(p)}" width="480">' for p in plots)
    # JSON inside <script>: no "<" at all, so no name can close the element or open a comment
    return _PAGE.format(title=html.escape(suite), note=note, plots=images,
                        data=json.dumps(data).replace("<", "\\u003c"))


def plots(rows: list[Row], out: Path) -> list[Path]:
    """wiki perplexity vs weight bits, and average accuracy vs size on disk with the Pareto front; PNG files."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    methods = sorted({str(r.model.get("method")) for r in rows} - {"base"})
    colors = {"base": "black", **{m: f"C{i}" for i, m in enumerate(methods)}}
    with_ppl = [r for r in rows if r.ppl is not None and r.model.get("bits")]
    if with_ppl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in with_ppl:
            ax.scatter(r.model["bits"], r.ppl, **_marker(r, colors))
        _legend(ax)
        ax.set(xlabel="weight bits", ylabel="wiki perplexity (protocol)", yscale="log", title="Perplexity vs bits")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 20, 30, not 2x10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xscale("log", base=2)  # 3, 4, 8 and 32 bits apart; mixed rows' stored averages fall between
        ax.set_xticks(sorted({int(b) for r in with_ppl if float(b := r.model["bits"]).is_integer()}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        _labels(ax, [(r.name, r.model["bits"], r.ppl) for r in with_ppl])
        ax.grid(alpha=0.3)
        made.append(_save(fig, out / "ppl_vs_bits.png"))
    with_avg = [r for r in rows if r.average is not None]
    if with_avg:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in with_avg:
            mb = r.model.get("size_bytes", 0) / 1e6
            ax.scatter(mb, r.average, **_marker(r, colors))
        front = pareto(with_avg)
        ax.plot([r.model.get("size_bytes", 0) / 1e6 for r in front], [r.average for r in front], "--", color="tab:red",
                label="Pareto front")
        ax.set(xlabel="size on disk (MB)", ylabel="average accuracy", title="Accuracy vs size")
        _labels(ax, [(r.name, r.model.get("size_bytes", 0) / 1e6, r.average) for r in with_avg])
        _legend(ax)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out / "accuracy_vs_size.png"))
    return made


def _labels(ax, points: list[tuple[str, float, float]]) -> None:
    """Name every point, moving a label down a line while it would overlap one already placed (rows close in size
    and accuracy, such as two budgets a few MB apart, otherwise print on top of each other)."""
    ax.figure.canvas.draw()  # settles the axes' limits, so data positions map to their final place on the page
    to_points = 72 / ax.figure.dpi
    placed: list[tuple[float, float, float]] = []  # (left, bottom, width) of each label, in points
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1])):
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        width = 4.2 * len(name)

        def free(dx: float, dy: float) -> bool:
            return not any(px + dx < qx + qw and qx < px + dx + width and abs(py + dy - qy) < 8 for qx, qy, qw in placed)

        # nearest first: right of the point, then left of it, a line further up or down each time
        tries = [(dx, dy) for dy in (3, -9, 11, -17, 19, -25, 27, -33) for dx in (3, -width - 3)]
        dx, dy = next((t for t in tries if free(*t)), tries[0])
        placed.append((px + dx, py + dy, width))
        ax.annotate(name, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points")


def _marker(row: Row, colors: dict[str, str]) -> dict[str, Any]:
    method = str(row.model.get("method"))
    return {"color": colors[method], "label": method}


def _legend(ax) -> None:
    """One legend entry per label (every point of a method carries the method's label)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="best", fontsize=8)


def pareto(rows: list[Row]) -> list[Row]:
    """The rows no other row beats on both size (smaller) and average accuracy (higher), by increasing size."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r.model.get("size_bytes", 0), -(r.average or 0))):
        if row.average > best:
            front.append(row)
            best = row.average
    return front


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    os.replace(tmp, path)
    return path




def build(store: str | Path | None, suite: str, out: str | Path) -> Built:
    """leaderboard.md, leaderboard.html and the plots for one suite's rows of the store, into `out`."""
    store = ResultsStore(store)
    rows, labels = collect(store.records(), suite)
    if not rows:
        raise BadInputError(f"{store.path}: no results for suite {suite!r} (run `llmq eval CHECKPOINT --suite {suite}` first)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = plots(rows, out)
    files = [write_text_atomic(out / "leaderboard.md", markdown(rows, labels, suite)),
             write_text_atomic(out / "leaderboard.html", page(rows, labels, suite, [p.name for p in images])), *images]
    return Built(files, len(rows))
