"""Peer comparison for block-wise QAT: AutoRound (sign-gradient rounding and clipping per block) on SmolLM2-135M,
on llmq's calibration tokens, scored by llmq's perplexity protocol on the checkpoint AutoRound saves.

Three steps, two venvs (auto-round pins its own transformers, so its step never imports llmq):

    # 1. project venv: llmq's calibration windows (the QAT recipes' lambada 64 x 512, seed 0) and the base folder
    .venv/bin/python benchmarks/peer_autoround.py prepare /tmp/ar
    # 2. auto-round's venv (pip install torch==2.13.0 auto-round==0.16.1): quantize, time it, save GPTQ format
    /tmp/arenv/bin/python benchmarks/peer_autoround.py quantize /tmp/ar w3g64 --iters 200
    # 3. project venv: `llmq import` the GPTQ folder, wiki and news perplexity (16 x 2048, fp32) → results JSON
    .venv/bin/python benchmarks/peer_autoround.py score /tmp/ar w3g64

Step 2 gives AutoRound exactly llmq's windows (a list of [4, 512] token batches: AutoRound's batch 4, as the QAT
recipes had when the first runs were made; they now use 1), fp32 on the CPU, torch.compile off (as llmq), and records the wall clock of `quantize_and_save` and the
peak RSS. `--iters` scales AutoRound's default 200 iterations per block to a wall-clock budget.
Results: benchmarks/results/peer_autoround.json (one row per run, appended).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "peer_autoround.json"
SCHEMES = {"w4g64": (4, 64, False), "w3g64": (3, 64, False), "w2g32": (2, 32, False)}
BATCH = 4


def prepare(work: Path) -> None:
    import llmq
    from llmq.calibration.batches import calibration_batches
    from llmq.loading import load_tokenizer
    from llmq.model.resolve import resolve

    recipe = llmq.Recipe.from_yaml(ROOT / "recipes" / "qat-w3g64.yaml")
    folder = resolve(recipe.model)
    windows = calibration_batches(recipe.calibration, load_tokenizer(folder))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(windows, work / "calib.pt")
    (work / "base.txt").write_text(str(folder))
    print(f"{tuple(windows.shape)} calibration windows of {recipe.calibration.data}; base {folder}")


def quantize(work: Path, scheme: str, iters: int) -> None:
    from importlib.metadata import version

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "llmq" not in sys.modules
    bits, group, sym = SCHEMES[scheme]
    base = (work / "base.txt").read_text()
    windows = torch.load(work / "calib.pt")
    batches = list(torch.split(windows, BATCH))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = work / f"{scheme}-iters{iters}"
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer, bits=bits, group_size=group, sym=sym, dataset=batches, nsamples=len(windows),
                   seqlen=windows.shape[1], batch_size=BATCH, iters=iters, device_map="cpu",
                   enable_torch_compile=False, seed=0)
    ar.quantize_and_save(str(out), format="auto_gptq")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = next(p.parent for p in out.rglob("config.json"))  # AutoRound writes into a sub-folder named after the model
    meta = {"scheme": scheme, "iters": iters, "quantize_s": round(seconds, 1), "peak_rss_mb": round(peak / 2**20),
            "calibration": list(windows.shape), "batch_size": BATCH, "folder": str(saved),
            "auto_round": version("auto-round")}
    (out / "llmq_peer_run.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))


def score(work: Path, scheme: str, iters: int) -> None:
    import llmq
    from llmq import data, formats
    from llmq.evaluation.perplexity import perplexity
    from llmq.version import __version__

    run = work / f"{scheme}-iters{iters}"
    meta = json.loads((run / "llmq_peer_run.json").read_text())
    imported = formats.import_checkpoint(meta["folder"], work / f"{run.name}-llmq", overwrite=True).output_dir
    model = llmq.load(imported, dtype=torch.float32)
    tokenizer = llmq.loading.load_tokenizer(imported)
    ppl = {}
    for corpus in ("wiki", "news"):
        windows = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text(corpus)), 2048, 16)
        ppl[corpus] = round(perplexity(model, windows, corpus).ppl, 3)
    row = {**meta, "wiki_ppl": ppl["wiki"], "news_ppl": ppl["news"], "date": time.strftime("%Y-%m-%d"),
           "llmq": __version__, "command": f"benchmarks/peer_autoround.py quantize WORK {scheme} --iters {iters}"}
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows.append(row)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(row))


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in ("prepare", "quantize", "score"):
        sys.exit(__doc__)
    work = Path(args[1])
    iters = int(args[args.index("--iters") + 1]) if "--iters" in args else 200
    if args[0] == "prepare":
        prepare(work)
    elif args[0] == "quantize":
        quantize(work, args[2], iters)
    else:
        score(work, args[2], iters)


if __name__ == "__main__":
    main()
