"""The published SmolLM2-135M leaderboard: build every row's checkpoint, evaluate it, draw the tables and plots.

    python benchmarks/leaderboard_smollm2.py [--suites quick leaderboard-cpu] [--store benchmarks/results/store.jsonl]

Rows: the base model; RTN and GPTQ at W8 (per-channel, symmetric), W4g64 and W3g64 (asymmetric), and GPTQ with
per-layer schemes chosen to the bits per weight of the uniform W3g64 / W4g64 rows and to a 100 MB checkpoint; GPTQ W2g32
and block-wise QAT at W3g64 and W2g32 (what training buys over its GPTQ start, and its wall clock in "method s"), from
the recipes in recipes/; NF4 through bitsandbytes (transformers' BitsAndBytesConfig, bitsandbytes' own quantization, saved in
its serialization). Checkpoints go to out/leaderboard/<row> (made once, reused); every result goes to the results
store, so a rerun only evaluates what is missing. The quick suite runs on every row; the leaderboard suite named
by --full (default leaderboard-cpu: the leaderboard's tasks and shots with CPU-sized limits) on the base and the
best 4-bit row of the quick suite. Tables and plots: benchmarks/leaderboard/<suite>/.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # row name -> recipe file
    "rtn-w8": "w8-per-channel.yaml", "rtn-w4g64": "quickstart.yaml", "rtn-w3g64": "w3g64.yaml",
    "gptq-w8": "gptq-w8.yaml", "gptq-w4g64": "gptq-w4g64.yaml", "gptq-w3g64": "gptq-w3g64.yaml",
    # per-layer schemes chosen to the bits per weight the uniform W3g64 / W4g64 rows store
    "gptq-budget-3.55bpw": "gptq-budget-3.55bpw.yaml", "gptq-budget-4.56bpw": "gptq-budget-4.56bpw.yaml",
    # a whole-checkpoint budget of 100 MB, the embedding's scheme chosen too
    "gptq-budget-100mb": "gptq-budget-100mb.yaml",
    # what training buys: block-wise QAT (15 / 30 minutes) against its GPTQ start
    "qat-w3g64": "qat-w3g64.yaml", "gptq-w2g32": "gptq-w2g32.yaml", "qat-w2g32": "qat-w2g32.yaml",
}
BASE = "smollm2-135m"


def quantized(name: str, out: Path) -> Path:
    """The row's llmq checkpoint, quantized once (evaluation happens through the suites, not the recipe)."""
    import llmq

    target = out / name
    if not (target / "config.json").is_file():
        recipe = yaml.safe_load((ROOT / "recipes" / RECIPES[name]).read_text())
        recipe.update(name=name, eval=None)
        llmq.run(recipe, output_dir=target)
    return target


def nf4(out: Path) -> Path:
    """SmolLM2 in bitsandbytes NF4 (blocks of 64, fp32 compute), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmq import loading
    from llmq.io import atomic_dir
    from llmq.model.resolve import resolve

    target = out / "bnb-nf4"
    if not (target / "config.json").is_file():
        base = resolve(BASE)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            loading.load_tokenizer(base).save_pretrained(tmp)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=str(ROOT / "benchmarks" / "results" / "store.jsonl"))
    p.add_argument("--out", default=str(ROOT / "out" / "leaderboard"))
    p.add_argument("--full", default="leaderboard-cpu", help="the suite for the base and the best 4-bit row")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--only", nargs="+", metavar="ROW", help="run the quick suite on these rows only (the others' results "
                   "stay in the store), redraw the quick tables, and stop")
    args = p.parse_args()
    import torch

    from llmq import loading
    from llmq.evaluation import suite as suites
    from llmq.evaluation.store import ResultsStore
    from llmq.evaluation.suite_run import evaluate_suite
    from llmq.reporting import leaderboard

    store, out = ResultsStore(args.store), Path(args.out)
    if args.only:
        unknown = sorted(set(args.only) - set(RECIPES))
        if unknown:
            p.error(f"--only: {unknown[0]} is not a row (rows: {', '.join(RECIPES)})")
        rows = {name: str(quantized(name, out)) for name in args.only}
        args.skip_full = True
    else:
        rows = {BASE: BASE, **{name: str(quantized(name, out)) for name in RECIPES}, "bnb-nf4": str(nf4(out))}
    quick = suites.load("quick")
    runs = {}
    for name, spec in rows.items():
        t = time.perf_counter()
        # every row runs in fp32, as the base does (a checkpoint stored in fp16 would otherwise run in fp16)
        model = None if name in (BASE, "bnb-nf4") else loading.load_model(spec, dtype=torch.float32)
        runs[name] = evaluate_suite(spec, quick, store, name=name, base=None if name == BASE else BASE, model=model,
                                    tokenizer=None if model is None else loading.load_tokenizer(spec))
        print(f"== {name}: quick suite {time.perf_counter() - t:.0f} s wall ({len(runs[name].served)} results from the store)")
    leaderboard.build(store.path, "quick", ROOT / "benchmarks" / "leaderboard" / "quick")
    if args.skip_full:
        return
    board, _ = leaderboard.collect(store.records(), "quick")
    best4 = max((r for r in board if r.model.get("bits") == 4 and r.average is not None), key=lambda r: r.average)
    full = suites.load(args.full)
    for name in (BASE, best4.name):
        t = time.perf_counter()
        run = evaluate_suite(rows[name], full, store, name=name, base=None if name == BASE else BASE)
        print(f"== {name}: {full.name} suite {time.perf_counter() - t:.0f} s wall ({len(run.served)} results from the store)")
    leaderboard.build(store.path, full.name, ROOT / "benchmarks" / "leaderboard" / full.name)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
