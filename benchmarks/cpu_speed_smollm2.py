"""CPU speed of llmq checkpoints against their base: SmolLM2-135M, W4 g64 and W8 per-channel, on this machine.

    python benchmarks/cpu_speed_smollm2.py [--rounds 5] [--skip-ppl]

1. `llmq bench generate` for each checkpoint (prompt 128 tokens, 64 decoded, greedy, KV cache), base and
   quantized in fp32 and bf16, round-robin in one process → benchmarks/results/cpu_generate_<row>.json.
2. What bf16 costs in accuracy: the perplexity protocol (wiki, 16 x 2048) of the base and the W4 checkpoint in
   fp32 (W4: the exact reference kernel) and bf16 (W4: the packed int4 kernel) → benchmarks/results/cpu_kernels_ppl.json.
3. `llmq bench kernels` on SmolLM2's layer shapes, W4 g64 and W8 per-channel → benchmarks/results/cpu_kernels_w{4,8}.json.
A Markdown summary goes to benchmarks/results/cpu_speed_smollm2.md. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE = "smollm2-135m"
ROWS = {"w4g64": "quickstart.yaml", "w8": "w8-per-channel.yaml"}  # row -> recipe (RTN)


def checkpoint(row: str) -> Path:
    import llmq

    target = ROOT / "out" / "cpu-speed" / row
    if not (target / "config.json").is_file():
        recipe = yaml.safe_load((ROOT / "recipes" / ROWS[row]).read_text())
        recipe.update(name=row, eval=None)
        llmq.run(recipe, output_dir=target)
    return target


def perplexities() -> dict:
    import torch

    from llmq import data, loading
    from llmq.evaluation.perplexity import perplexity
    from llmq.model.resolve import resolve

    folder = resolve(BASE)
    ids = data.tokenize_corpus(loading.load_tokenizer(folder), data.load_text("wiki"))
    windows = data.eval_windows(ids, 2048, 16)
    out = {}
    for label, spec in (("base", BASE), ("w4g64", str(checkpoint("w4g64")))):
        for dtype in ("float32", "bfloat16"):
            model = loading.load_model(resolve(spec), dtype=getattr(torch, dtype))
            p = perplexity(model, windows, "wiki", desc=f"{label} {dtype}")
            out[f"{label} {dtype}"] = {"ppl": p.ppl, "seconds": p.seconds}
            print(f"{label} {dtype}: ppl {p.ppl:.4f} ({p.seconds:.0f} s)")
            del model
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-ppl", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # llmq bench progress lines
    from llmq import bench

    lines = ["# CPU speed of llmq checkpoints (SmolLM2-135M-Instruct)", "",
             (f"`python benchmarks/cpu_speed_smollm2.py` ({time.strftime('%Y-%m-%d')}); numbers are medians of "
              f"{args.rounds} interleaved rounds."), ""]
    for row in ROWS:
        result = bench.bench_generate(str(checkpoint(row)), BASE, ("float32", "bfloat16"), 128, 64, args.rounds)
        bench.write_json(result, RESULTS / f"cpu_generate_{row}.json")
        lines += [f"## Generation, {row} (`llmq bench generate`; prompt 128, decode 64; {result['device']})", "",
                  "| model | kernels | weights MB | prefill tok/s | decode tok/s | decode vs base fp32 |",
                  "|---|---|---|---|---|---|"]
        for r in result["rows"]:
            served = ", ".join(f"{k}: {v}" for k, v in r["kernels"].items()) or "dense"
            lines.append(f"| {r['label']} | {served} | {r['weights_mb']:.0f} | {r['prefill_tok_s']:.1f} | "
                         f"{r['decode_tok_s']:.2f} | {r['decode_speedup']:.2f}x |")
        lines.append("")
    if not args.skip_ppl:
        ppl = perplexities()
        (RESULTS / "cpu_kernels_ppl.json").write_text(json.dumps(ppl, indent=2) + "\n")
        lines += ["## Perplexity in fp32 and bf16 (wiki, 16 x 2048)", "", "| model | ppl | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {v['ppl']:.4f} | {v['seconds']:.0f} |" for k, v in ppl.items()]
        lines.append("")
    for bits, group in ((4, 64), (8, None)):
        result = bench.bench_kernels(bits=bits, group_size=group, rounds=args.rounds)
        bench.write_json(result, RESULTS / f"cpu_kernels_w{bits}.json")
        lines += [(f"## One layer, W{bits} {'g' + str(group) if group else 'per-channel'} (`llmq bench kernels`; "
                   f"copy bandwidth {result['bandwidth_gbps']:.1f} GB/s)"), "",
                  "| K x N | M | kernel | dtype | µs | GB/s | % bw | vs dense bf16 |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['k']}x{r['n']} | {r['m']} | {r['kernel']} | {r['dtype']} | {r['us']:.1f} | {r['gbps']:.1f} | "
                  f"{r['pct_bandwidth']:.0f} | {r['speedup_vs_bf16']:.2f}x |" for r in result["rows"]]
        lines.append("")
    (RESULTS / "cpu_speed_smollm2.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
