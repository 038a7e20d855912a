"""GPTQ vs RTN on SmolLM2-135M, side by side: quantization wall time and peak RSS (each recipe quantized alone in a
fresh process by benchmarks/quantize_only.py), then wiki perplexity of the saved checkpoint per the protocol.

    python benchmarks/gptq_bench.py RECIPE.yaml [...] [--windows 16] [--out benchmarks/results/gptq_smollm2]

Each recipe's `output.dir` is ignored (checkpoints go to a temporary folder). Appends one JSON line per recipe to
<out>.jsonl and rewrites <out>.md from all lines there. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llmq import data, loading
from llmq.evaluation.perplexity import perplexity
from llmq.pipeline import as_recipe, scheme_label

HERE = Path(__file__).parent


def evaluate(folder: Path, windows: int) -> dict:
    tok = loading.load_tokenizer(folder)
    ids = data.tokenize_corpus(tok, data.load_text("wiki"))
    model = loading.load_model(folder, dtype=torch.float32)
    return perplexity(model, data.eval_windows(ids, 2048, windows), "wiki").to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "gptq_smollm2"))
    args = ap.parse_args()
    out = Path(args.out)
    for path in args.recipes:
        recipe = as_recipe(path)
        with tempfile.TemporaryDirectory(prefix="llmq-bench-") as tmp:
            ckpt = Path(tmp) / "ckpt"
            proc = subprocess.run(
                [sys.executable, str(HERE / "quantize_only.py"), path, str(ckpt)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                sys.exit(f"{path}: quantization failed\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(
                name=recipe.name,
                method=recipe.method.to_dict() if hasattr(recipe.method, "to_dict") else recipe.method.model_dump(),
                scheme=scheme_label(recipe),
                calibration=recipe.calibration.model_dump(),
                ppl=evaluate(ckpt, args.windows),
            )
        print(json.dumps(row))
        with open(out.with_suffix(".jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
    write_table(out)


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    lines = [
        "# GPTQ vs RTN on SmolLM2-135M",
        "",
        "wiki perplexity per the protocol (fp32); quantization alone timed in a fresh process on 2 CPU cores "
        "(model resolution, calibration tokenizing and evaluation excluded); peak RSS sampled while quantizing.",
        "Command: `python benchmarks/gptq_bench.py recipes/<recipe>.yaml ...`",
        "",
        "| recipe | scheme | method options | calibration | wiki ppl | quantize s | peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["method"]
        opts = ", ".join(
            f"{k}={v}"
            for k, v in m.items()
            if k
            in (
                "act_order",
                "static_groups",
                "true_sequential",
                "damp",
                "clip",
                "clip_norm",
                "clip_max_shrink",
                "clip_grid",
                "clip_weights",
            )
        )
        c = r["calibration"]
        lines.append(
            f"| {r['name']} | {r['scheme']} | {m['name']}: {opts} | {c['n_samples']}x{c['seqlen']} {c['data']} | "
            f"{r['ppl']['ppl']:.3f} | {r['quantize_s']:.1f} | {r['peak_rss_gb_while_quantizing']:.3f} |"
        )
    notes = [f"- {r['name']}: {r['note']}" for r in rows if r.get("note")]
    lines += [""] + notes if notes else []
    lines += [
        "",
        "Weights digests (sha256 over every shard, in name order): "
        + ", ".join(f"{r['name']} `{r['weights_sha256']}`" for r in rows if "weights_sha256" in r)
        + ".",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
