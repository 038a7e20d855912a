"""The QAT perplexity ladder on SmolLM2-135M: base, initialisation (RTN or GPTQ), QAT — one recipe after another.

    python benchmarks/qat_smollm2.py [recipes/qat-*.yaml ...]     (default: the recipes listed in RECIPES, in order)

Each recipe runs through `llmq.run` exactly as `llmq run` would (wiki perplexity per the protocol, 16 x 2048
tokens, on the checkpoint reloaded from disk; the initialisation's perplexity on the fake-quant model before
training, which equals the PTQ model exactly). The base model is evaluated once, in the first run; later runs skip
that repeat (eval.baseline: false) and take its number. Results are appended to benchmarks/results/qat_smollm2.jsonl as
each run finishes and the table benchmarks/results/qat_smollm2.md is rewritten from that file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import llmq
from llmq.recipe import Recipe

RECIPES = ["qat-w4g64-whole-model", "qat-w3g64-whole-model", "qat-w3g64-rtn", "qat-w4g64-rtn", "qat-w2g32-whole-model", "qat-w2g32-4x"]
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_one(path: Path, base: dict | None) -> dict:
    recipe = Recipe.from_yaml(path)
    if base is not None:
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"baseline": False})})
    t = time.perf_counter()
    result = llmq.run(recipe, overwrite=True, output_dir=ROOT / "out" / recipe.name)
    wall = time.perf_counter() - t
    m = result.metrics
    base = m.get("base", base)
    qat = result.report["quantization"]["qat"]
    init, final = m["init"]["ppl"], m["quantized"]["ppl"]
    return {
        "recipe": recipe.name,
        "scheme": f"W{recipe.scheme.bits}g{recipe.scheme.group_size}",
        "init": recipe.method.init,
        "budget_minutes": recipe.training.budget.minutes,
        "base_ppl": base["ppl"],
        "init_ppl": init,
        "qat_ppl": final,
        "recovery": (init - final) / (init - base["ppl"]),
        "method_seconds": result.timings["quantize_s"],  # init + training + conversion (init eval excluded)
        "init_seconds": qat["init_seconds"],
        "steps": qat["training"]["steps"],
        "tokens": qat["training"]["tokens"],
        "tokens_per_s": qat["training"]["tokens_per_s"],
        "first_loss": qat["training"]["losses"][0],
        "last_loss": qat["training"]["losses"][-1],
        "run_seconds": wall,
        "eval": {"corpus": base["corpus"], "seqlen": base["seqlen"], "windows": base["windows"], "tokens": base["tokens"]},
        "base": base,
        "llmq_version": llmq.__version__,
    }


def write_table(rows: list[dict]) -> None:
    lines = [
        "# QAT on SmolLM2-135M: the perplexity ladder",
        "",
        "Command: `python benchmarks/qat_smollm2.py` (2 CPU cores, fp32). Wiki perplexity per the protocol (16 x 2048 tokens, "
        "32,752 predicted); lower is better. `init` is the PTQ model QAT starts from (measured on the fake-quant model "
        "before training, identical to it); recovery = (ppl_init - ppl_qat) / (ppl_init - ppl_base). `minutes` is the "
        "recipe's budget for initialisation + training; `method s` what it took (conversion included).",
        "",
        "| recipe | scheme | init | minutes | base | init ppl | QAT ppl | recovery | steps | tokens | tok/s | method s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['scheme']} | {r['init']} | {r['budget_minutes']:g} | {r['base_ppl']:.2f} | "
            f"{r['init_ppl']:.2f} | {r['qat_ppl']:.2f} | {r['recovery']:.1%} | {r['steps']} | {r['tokens']:,} | "
            f"{r['tokens_per_s']:.0f} | {r['method_seconds']:.0f} |"
        )
    (RESULTS / "qat_smollm2.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv] or [ROOT / "recipes" / f"{name}.yaml" for name in RECIPES]
    log = RESULTS / "qat_smollm2.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    base = rows[-1]["base"] if rows else None
    for path in paths:
        row = run_one(path, base)
        base = row["base"]
        rows.append(row)
        with log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        write_table(rows)
        print(f"{row['recipe']}: base {row['base_ppl']:.3f}  init {row['init_ppl']:.3f}  qat {row['qat_ppl']:.3f}  "
              f"recovery {row['recovery']:.1%}  ({row['steps']} steps, {row['method_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
