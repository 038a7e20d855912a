"""Mixed precision to a budget on SmolLM2-135M: uniform GPTQ W3g64 and W4g64 next to GPTQ models whose per-layer
schemes were chosen to the same bits per weight (scheme.budget), and to a whole-checkpoint size; all in one process,
one after another, on the same calibration and the perplexity protocol (wiki 16 x 2048, fp32). Budget rows tie the
layers that read one input (q/k/v, gate/up: vLLM fuses them); -fp16 rows store scales and unquantized tensors in
fp16 (output.dtype), the others in fp32 like the uniform rows.

    python benchmarks/budget_smollm2.py [--out benchmarks/results/budget_smollm2] [--keep out/budget-bench]

The budgets are the bits per weight the uniform checkpoints store (measured from their files, scales and zero points
included). Writes <out>.json (every number) and <out>.md. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmq
from llmq import data, loading
from llmq.checkpoint.safetensors_io import files_stamp, weights_bytes
from llmq.evaluation.checkpoint_info import stored_bits_per_weight
from llmq.evaluation.perplexity import perplexity

HERE = Path(__file__).parent
CANDIDATES = ["W2g64", "W3g64", "W3g128", "W4g64", "W4g128", "W8g128"]
EMBEDDING_CANDIDATES = ["none", "W8", "W4g64"]


def recipe(name: str, bits: int, out: Path, budget: dict | None = None, baseline: bool = False,
           dtype: str = "float32", embedding: str | None = None) -> dict:
    r = llmq.Recipe.from_yaml(HERE.parent / "recipes" / "gptq-w3g64.yaml").to_dict()  # GPTQ settings of the uniform runs
    r.update(name=name, output={"dir": str(out / name), "dtype": dtype})
    r["scheme"] = {"bits": bits, "group_size": 64, "symmetric": False}
    if budget is not None:
        r["scheme"]["budget"] = {"candidates": CANDIDATES, **budget}
    if embedding is not None:
        r["scheme"]["embedding"] = embedding
    # fp16 checkpoints are evaluated in fp32 by this script (the protocol's dtype), not as llmq run would (as saved)
    r["eval"] = {**r["eval"], "baseline": baseline} if dtype == "float32" else None
    return r


def fp32_perplexity(folder: Path) -> float:
    """The protocol's perplexity in fp32; kept beside the checkpoint (keyed by its files), so --reuse does not
    evaluate it again."""
    saved, stamp = folder.parent / f"{folder.name}.fp32-ppl.json", files_stamp(folder)
    if saved.is_file() and json.loads(saved.read_text()).get("files") == stamp:
        return json.loads(saved.read_text())["ppl"]
    tok = loading.load_tokenizer(folder)
    windows = data.eval_windows(data.tokenize_corpus(tok, data.load_text("wiki")), 2048, 16)
    ppl = perplexity(loading.load_model(folder, dtype=torch.float32), windows, "wiki").ppl
    saved.write_text(json.dumps({"files": stamp, "ppl": ppl}))
    return ppl


def run(r: dict, reuse: bool) -> dict:
    """One row: llmq run (or, with reuse, the report.json a finished run of the same name left)."""
    t = time.perf_counter()
    folder = Path(r["output"]["dir"])
    if reuse and (folder / "report.json").is_file():
        report = json.loads((folder / "report.json").read_text())
        metrics, timings = report["metrics"], report["timings"]
    else:
        result = llmq.run(r, overwrite=True)
        report, metrics, timings = result.report, result.metrics, result.timings
    q = report["quantization"]
    ppl = metrics["quantized"]["ppl"] if r["eval"] is not None else fp32_perplexity(folder)
    row = {"name": r["name"], "ppl": ppl,
           "bits_per_weight": stored_bits_per_weight(folder), "size_mb": weights_bytes(folder) / 1e6,
           "quantize_s": timings["quantize_s"], "budget_s": timings.get("budget_s"),
           "wall_s": time.perf_counter() - t}
    if "base" in metrics:
        row["base_ppl"] = metrics["base"]["ppl"]
    if "budget" in q:
        b = q["budget"]
        row.update(budget=b["budget"], allowed=b["allowed"], used=b["used"], counts=b["counts"],
                   sensitivity_s=b["sensitivity"]["seconds"], sensitivity_cached=bool(b["sensitivity"]["cached"]),
                   layers=b["layers"])
        if "embedding" in b:
            row["embedding_choice"] = {"chosen": b["embedding"]["chosen"], "candidates": b["embedding"]["candidates"]}
    if "embedding" in q:
        row["embedding"] = q["embedding"]["scheme"]
    print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "budget_smollm2"))
    ap.add_argument("--keep", default="out/budget-bench", help="where the checkpoints go")
    ap.add_argument("--reuse", action="store_true", help="take rows whose checkpoint (with report.json) is in --keep")
    args = ap.parse_args()
    keep = Path(args.keep)

    def run_row(*a, **k) -> dict:
        return run(recipe(*a, **k), args.reuse)

    rows = [run_row("uniform-w3g64", 3, keep, baseline=True), run_row("uniform-w4g64", 4, keep)]
    w3, w4 = rows[0], rows[1]
    # the same storage (fp32 scales) as the uniform rows: what choosing schemes per layer buys on its own
    rows.append(run_row("budget-w3g64-bpw", 3, keep, {"bits_per_weight": w3["bits_per_weight"]}))
    # the same bits per weight, stored with fp16 scales (output.dtype): the scale bits saved go to the codes
    rows.append(run_row("budget-w3g64-bpw-fp16", 3, keep, {"bits_per_weight": w3["bits_per_weight"]}, dtype="float16"))
    rows.append(run_row("budget-w4g64-bpw-fp16", 4, keep, {"bits_per_weight": w4["bits_per_weight"]}, dtype="float16"))
    # whole-checkpoint sizes: unquantized tensors (the tied 49k x 576 embedding) and scales in fp16
    rows.append(run_row("uniform-w4g64-fp16", 4, keep, dtype="float16"))
    rows.append(run_row("budget-100mb-fp16", 4, keep, {"size_mb": 100}, dtype="float16"))
    # the token embedding quantized too (scheme.embedding, 8-bit per row; the tied lm_head reads the same table)
    rows.append(run_row("uniform-w4g64-fp16-emb-w8", 4, keep, dtype="float16", embedding="W8"))
    rows.append(run_row("budget-100mb-fp16-emb-w8", 4, keep, {"size_mb": 100}, dtype="float16", embedding="W8"))
    # the budget chooses the table's scheme too (scheme.budget.embedding)
    choice = {"embedding": EMBEDDING_CANDIDATES}
    rows.append(run_row("budget-100mb-fp16-emb-choice", 4, keep, {"size_mb": 100, **choice}, dtype="float16"))
    rows.append(run_row("budget-80mb-fp16-emb-choice", 4, keep, {"size_mb": 80, **choice}, dtype="float16"))
    # the same 80 MB with the table fixed at W8: checks the choice the solver made between table and layers
    rows.append(run_row("budget-80mb-fp16-emb-w8", 4, keep, {"size_mb": 80}, dtype="float16", embedding="W8"))
    gap = w3["ppl"] - w4["ppl"]
    for r in rows[2:5]:
        ref = w3 if "w3" in r["name"] else w4
        if ref is w3:
            r["gap_closed_vs_uniform_w3_to_w4"] = (w3["ppl"] - r["ppl"]) / gap
        r["ppl_vs_uniform"] = r["ppl"] / ref["ppl"] - 1
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Mixed precision to a budget on SmolLM2-135M", "",
             "GPTQ (recipes/gptq-w3g64.yaml settings: act order + static groups, MSE clipping, 64 x 512 lambada), wiki "
             "perplexity per the protocol (16 x 2048, fp32), all runs in one process on this project's 2-core CPU. "
             "Budget runs choose each layer's scheme among " + ", ".join(CANDIDATES) + "; -fp16 rows store scales and "
             "unquantized tensors in fp16, the others in fp32 like the uniform rows; -emb-w8 rows also store the token "
             "embedding (tied to the output projection) as 8-bit integers per row (scheme.embedding: W8). Bits per "
             "weight are counted over the quantized Linear layers as stored (codes, scales, zero points). "
             "Command: `python benchmarks/budget_smollm2.py --reuse` (rows whose checkpoint is already in "
             "out/budget-bench are read from their report.json).", "",
             f"Base model perplexity: {w3['base_ppl']:.3f}.", "",
             "| model | bits / weight (stored) | checkpoint MB | wiki ppl | vs uniform | gap W3→W4 closed | schemes | sensitivity s | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counts = ", ".join(f"{k}×{v}" for k, v in r.get("counts", {}).items() if v) or "uniform"
        if r.get("embedding"):
            counts += f"; embedding {r['embedding']}" + (" (chosen)" if r.get("embedding_choice") else "")
        vs = f"{r['ppl_vs_uniform']:+.1%}" if "ppl_vs_uniform" in r else "-"
        gap_closed = f"{r['gap_closed_vs_uniform_w3_to_w4']:.0%}" if "gap_closed_vs_uniform_w3_to_w4" in r else "-"
        sens = "-" if r.get("sensitivity_s") is None else f"{r['sensitivity_s']:.0f}" + (" (cached)" if r["sensitivity_cached"] else "")
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['size_mb']:.1f} | {r['ppl']:.3f} | {vs} | {gap_closed} | "
                     f"{counts} | {sens} | {r['quantize_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
