"""Block-wise QAT (Block-AP) on SmolLM2-135M: run a recipe with the base evaluation off (the base is 19.458 in the
README), and keep the quantized perplexity, the per-block output errors before and after training, and the timings.

    python benchmarks/qat_blockwise_smollm2.py [RECIPE ...] → benchmarks/results/qat_blockwise_smollm2.json
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import llmq

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "qat_blockwise_smollm2.json"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipes = sys.argv[1:] or [str(ROOT / "recipes" / "qat-w3g64-blockwise.yaml")]
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for path in recipes:
        recipe = llmq.Recipe.from_yaml(path)
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"baseline": False})})
        t = time.perf_counter()
        result = llmq.run(recipe, overwrite=True, output_dir=ROOT / "out" / recipe.name)
        blocks = [r for r in result.report["layers"] if r["method"] == "qat-block" and r["layer"] == "self_attn.q_proj"]
        rows.append({
            "recipe": Path(path).name, "date": time.strftime("%Y-%m-%d"), "method": recipe.method.model_dump(),
            "ppl": result.metrics["quantized"]["ppl"], "windows": result.metrics["quantized"]["windows"],
            "quantize_s": round(result.timings["quantize_s"], 1), "wall_s": round(time.perf_counter() - t, 1),
            "block_error_ratio_median": statistics.median(b["loss"] / b["init_loss"] for b in blocks),
            "block_errors": [(b["block"], b["init_loss"], b["loss"]) for b in blocks],
        })
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"{recipe.name}: ppl {rows[-1]['ppl']:.3f}, quantize {rows[-1]['quantize_s']} s")


if __name__ == "__main__":
    main()
