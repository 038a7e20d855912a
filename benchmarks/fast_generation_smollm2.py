"""Fast generation on the CPU (issue 18): SmolLM2-135M W4 g64 against its base, eager and torch.compile'd, and the
default (fp32) load path, on this machine.

    python benchmarks/fast_generation_smollm2.py [--rounds 5] [--skip-compile] [--skip-ppl]

1. `llmq bench generate` in fp32 and bf16 (the manual KV-cache loop, eager) → results/fast_generate_eager.json:
   the default load path (fp32, no dtype argument) against the base loaded the same way.
2. `llmq bench generate --compile --dtype bfloat16` (generate() with a static cache, eager and compiled side by side)
   → results/fast_generate_compiled.json.
3. The perplexity protocol (wiki, 16 x 2048) in fp32 of the base and the W4 checkpoint, one after the other in one
   process: llmq's exact evaluation (dense kernel) must take about the base's time and give the reference's
   numbers → results/fast_eval_fp32.json.
A Markdown summary goes to results/fast_generation_smollm2.md. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cpu_speed_smollm2 import BASE, RESULTS, checkpoint


def perplexity_times(ckpt: Path) -> dict:
    import torch

    from llmq import data, loading
    from llmq.evaluation.perplexity import perplexity
    from llmq.model.resolve import resolve

    folder = resolve(BASE)
    windows = data.eval_windows(data.tokenize_corpus(loading.load_tokenizer(folder), data.load_text("wiki")), 2048, 16)
    out = {}
    for label, spec in (("base float32", BASE), ("w4g64 float32", str(ckpt))):
        model = loading.load_model(resolve(spec))  # no dtype: what from_pretrained gives by default (fp32)
        assert next(model.parameters()).dtype == torch.float32
        p = perplexity(model, windows, "wiki", desc=label)
        out[label] = {"ppl": p.ppl, "seconds": p.seconds}
        print(f"{label}: ppl {p.ppl:.4f} ({p.seconds:.0f} s)")
        del model
    out["time_ratio"] = out["w4g64 float32"]["seconds"] / out["base float32"]["seconds"]
    return out


def _table(result: dict) -> list[str]:
    lines = ["| model | kernels | weights MB | prefill tok/s | decode tok/s | decode vs first row |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        served = ", ".join(f"{k}: {v}" for k, v in r["kernels"].items()) or "dense"
        lines.append(f"| {r['label']} | {served} | {r['weights_mb']:.0f} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.2f} | {r['decode_speedup']:.2f}x |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-ppl", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llmq import bench

    ckpt = checkpoint("w4g64")
    lines = ["# Fast generation, SmolLM2-135M-Instruct W4 g64 (RTN, quickstart)", "",
             f"`python benchmarks/fast_generation_smollm2.py` ({time.strftime('%Y-%m-%d')}); medians of {args.rounds} "
             "interleaved rounds; prompt 128, decode 64 greedy tokens.", ""]
    eager = bench.bench_generate(str(ckpt), BASE, ("float32", "bfloat16"), 128, 64, args.rounds)
    bench.write_json(eager, RESULTS / "fast_generate_eager.json")
    lines += [f"## Eager, manual KV-cache loop ({eager['device']}, torch {eager['torch']})", "", *_table(eager)]
    if not args.skip_compile:
        compiled = bench.bench_generate(str(ckpt), BASE, ("bfloat16",), 128, 64, args.rounds, compile=True)
        bench.write_json(compiled, RESULTS / "fast_generate_compiled.json")
        lines += [f"## generate() with a static cache, eager and torch.compile'd ({compiled['device']})", "",
                  *_table(compiled)]
    if not args.skip_ppl:
        ppl = perplexity_times(ckpt)
        bench.write_json(ppl, RESULTS / "fast_eval_fp32.json")
        lines += ["## Exact fp32 evaluation (perplexity protocol, wiki 16 x 2048, loaded with no dtype)", "",
                  "| model | ppl | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {v['ppl']:.4f} | {v['seconds']:.0f} |" for k, v in ppl.items() if isinstance(v, dict)]
        lines += ["", f"Quantized / base evaluation time: {ppl['time_ratio']:.2f}x", ""]
    (RESULTS / "fast_generation_smollm2.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
