"""Quantize a recipe's model and nothing else, in this process, and print wall time and peak RSS as JSON.

Used by benchmarks/gptq_bench.py in a fresh subprocess per recipe, so peak RSS is that of quantizing alone (model
resolution and tokenizing the calibration text happen first and are timed separately; no evaluation). A recipe with
`scheme.budget` first chooses its schemes (sensitivity + solve), timed and sampled on their own.

    python benchmarks/quantize_only.py RECIPE OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from llmq import calibration, loading
from llmq.environment import folder_dtype, output_dtype
from llmq.io import partial_dir
from llmq.memory import PeakRss
from llmq.model.resolve import resolve
from llmq.pipeline import as_recipe
from llmq.quantization import blockwise, budget


def main(recipe_path: str, out: str) -> dict:
    recipe = as_recipe(recipe_path)
    t = time.perf_counter()
    base = resolve(recipe.model)
    tokenizer = loading.load_tokenizer(base)
    needs_windows = recipe.method.name != "rtn" or recipe.scheme.budget is not None
    calib = calibration.calibration_batches(recipe.calibration, tokenizer) if needs_windows else None
    prepare_s = time.perf_counter() - t
    work = partial_dir(Path(out))
    shutil.rmtree(work, ignore_errors=True)
    chose = {}
    if recipe.scheme.budget is not None:  # sensitivity + solve, timed and sampled on their own
        t = time.perf_counter()
        with PeakRss() as sampler:
            recipe, record = budget.choose(recipe, base, calib, output_dtype(recipe.output.dtype, folder_dtype(base)), torch.device("cpu"))
        chose = {"budget_s": round(time.perf_counter() - t, 2), "sensitivity_s": record["sensitivity"]["seconds"],
                 "sensitivity_cached": bool(record["sensitivity"]["cached"]), "budget_used": record["used"],
                 "peak_rss_gb_while_choosing": round(sampler.bytes / 2**30, 3)}
    with PeakRss() as sampler:
        summary = blockwise.quantize_checkpoint(recipe, base, work, output_dtype(recipe.output.dtype, folder_dtype(base)), calib)
    tokenizer.save_pretrained(work)
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return {
        "recipe": recipe_path,
        "threads": torch.get_num_threads(),
        "prepare_s": round(prepare_s, 2),
        "quantize_s": round(summary.seconds, 2),
        "rss_gb_at_start_of_quantize": round(sampler.start / 2**30, 3),
        "peak_rss_gb_while_quantizing": round(sampler.bytes / 2**30, 3),
        "peak_rss_gb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "layers": len(summary.layers),
        **chose,
        "weights_sha256": weights_digest(Path(out)),
    }


def weights_digest(folder: Path) -> str:
    """One sha256 over every safetensors shard in name order: equal digests mean byte-identical weights."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
