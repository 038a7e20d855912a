"""Measure RTN on SmolLM2-135M: W8 per-channel, W4g64 asym / sym, W3g64 asym / sym, each with min-max and with
the MSE clipping search. Every row goes through `llmq.run` (quantize → save → from_pretrained → perplexity),
so the numbers are those of the saved checkpoints. The base model is evaluated once, in the first run.

    python benchmarks/rtn_sweep.py [--windows 16] [--out benchmarks/results/rtn_smollm2]

Writes <out>.json (all reports) and <out>.md (the table). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import llmq

SCHEMES = [
    ("W8 per-channel sym", {"bits": 8, "group_size": None, "symmetric": True}),
    ("W4g64 asym", {"bits": 4, "group_size": 64, "symmetric": False}),
    ("W4g64 sym", {"bits": 4, "group_size": 64, "symmetric": True}),
    ("W3g64 asym", {"bits": 3, "group_size": 64, "symmetric": False}),
    ("W3g64 sym", {"bits": 3, "group_size": 64, "symmetric": True}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/rtn_smollm2")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmq-sweep-"))
    rows, base = [], None
    try:
        for label, scheme in SCHEMES:
            for clip in ("minmax", "mse"):
                recipe = {
                    "name": f"{label} {clip}",
                    "model": "smollm2-135m",
                    "method": {"name": "rtn", "clip": clip},
                    "scheme": scheme,
                    "eval": {"data": "wiki", "seqlen": 2048, "max_windows": args.windows, "baseline": base is None},
                    "output": {"dir": str(work / "ckpt")},
                }
                report = llmq.run(recipe, overwrite=True).report
                base = base or report["metrics"]["base"]
                rows.append({"label": label, "clip": clip, "report": report})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    q0 = rows[0]["report"]["metrics"]["quantized"]
    lines = [
        f"# RTN on SmolLM2-135M — wiki perplexity, {q0['windows']} windows x {q0['seqlen']} tokens "
        f"({q0['tokens']} predicted tokens), fp32, 2 CPU cores",
        "",
        f"Base: **{base['ppl']:.3f}** (eval {base['seconds']:.0f} s). Command: `python benchmarks/rtn_sweep.py --windows {args.windows}`.",
        "",
        "| scheme | clip | perplexity | increase | quantize s | safetensors MB | of base |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rep = r["report"]
        m, sz = rep["metrics"]["quantized"], rep["sizes"]
        lines.append(
            f"| {r['label']} | {r['clip']} | {m['ppl']:.3f} | {m['ppl'] - base['ppl']:+.3f} | "
            f"{rep['timings']['quantize_s']:.1f} | {sz['quantized_bytes'] / 1e6:.1f} | {sz['ratio']:.1%} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"base": base, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
