"""Block-wise QAT on SmolLM2-135M: run recipes with the base evaluation off (the base is 19.458 in the README), and
keep the quantized wiki perplexity, the perplexity on a third text (`news`: neither the calibration text nor wiki),
the per-block output errors before and after training, the steps per block and the timings.

    python benchmarks/qat_blockwise_smollm2.py [RECIPE ...] → benchmarks/results/qat_blockwise_smollm2.json
    python benchmarks/qat_blockwise_smollm2.py --news CHECKPOINT_OR_MODEL ...   (news perplexity only, e.g. base, GPTQ)

News perplexity: the first 16 windows of 2048 tokens of `news` (~33k of its ~75k tokens), fp32, as wiki's protocol.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import llmq
from llmq import data
from llmq.evaluation.perplexity import perplexity
from llmq.model.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "qat_blockwise_smollm2.json"


def news_ppl(model_or_dir) -> float:
    """Perplexity on the `news` corpus, 16 x 2048 tokens, of a checkpoint folder or model spec (loaded in fp32)."""
    folder = model_or_dir if Path(model_or_dir).is_dir() else resolve(str(model_or_dir))
    model = llmq.load(folder, dtype=torch.float32)
    tokenizer = llmq.loading.load_tokenizer(folder)
    windows = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text("news")), 2048, 16)
    return perplexity(model, windows, "news").ppl


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    if sys.argv[1:2] == ["--news"]:
        for spec in sys.argv[2:]:
            rows.append({"news_only": spec, "date": time.strftime("%Y-%m-%d"), "news_ppl": news_ppl(spec)})
            RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
            print(f"{spec}: news ppl {rows[-1]['news_ppl']:.3f}")
        return
    for path in sys.argv[1:] or [str(ROOT / "recipes" / "qat-w3g64.yaml")]:
        recipe = llmq.Recipe.from_yaml(path)
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"baseline": False})})
        t = time.perf_counter()
        result = llmq.run(recipe, overwrite=True, output_dir=ROOT / "out" / recipe.name)
        wall = time.perf_counter() - t
        blocks = [r for r in result.report["layers"] if r["method"] == "qat-block" and r["layer"] == "self_attn.q_proj"]
        rows.append({
            "recipe": Path(path).name, "date": time.strftime("%Y-%m-%d"), "method": recipe.method.model_dump(),
            "scheme": recipe.scheme.model_dump(exclude_none=True),
            "ppl": result.metrics["quantized"]["ppl"], "windows": result.metrics["quantized"]["windows"],
            "news_ppl": news_ppl(result.output_dir),
            "quantize_s": round(result.timings["quantize_s"], 1), "wall_s": round(wall, 1),
            # the process's peak so far: the run's, or an earlier one's in the same process (one recipe per call)
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "quantize_peak_rss_mb": result.report["quantization"].get("peak_rss_mb"),  # the method alone, sampled
            "steps_per_block": blocks[0]["steps"] if blocks else None,
            "block_error_ratio_median": statistics.median(b["loss"] / b["init_loss"] for b in blocks),
            "block_errors": [(b["block"], b["init_loss"], b["loss"]) for b in blocks],
        })
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"{recipe.name}: wiki ppl {rows[-1]['ppl']:.3f}, news ppl {rows[-1]['news_ppl']:.3f}, "
              f"quantize {rows[-1]['quantize_s']} s")


if __name__ == "__main__":
    main()
