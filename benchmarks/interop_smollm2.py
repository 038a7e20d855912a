"""Interop on SmolLM2-135M: quantize with llmq, export to GPTQ and compressed-tensors, load every export with its
format's own loader in transformers (optimum + gptqmodel; compressed-tensors), and measure wiki perplexity with
the llmq protocol side by side with the llmq checkpoint; then import each export back and check the bytes.

    python benchmarks/interop_smollm2.py [RECIPE ...] [--windows 16] [--out benchmarks/results/interop_smollm2]

Writes <out>.json and <out>.md. A benchmark, not a test (tests/test_formats.py asserts the same on tiny models).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmq
from llmq import data, formats, loading
from llmq.errors import BadInputError
from llmq.evaluation.perplexity import perplexity
from llmq.model.resolve import resolve

DEFAULT = ["recipes/gptq-w4g64.yaml", "recipes/gptq-w4g64-sym.yaml", "recipes/w8-per-channel.yaml"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return out


def kinds(model) -> list[str]:
    return sorted({type(m).__name__ for n, m in model.named_modules() if ".layers." in n and "Linear" in type(m).__name__})


def evaluate(model, windows, label: str) -> dict:
    with torch.no_grad():
        first = model(windows[:1]).logits
    ppl = perplexity(model, windows, "wiki", desc=label).to_dict()
    return {"ppl": ppl["ppl"], "tokens": ppl["tokens"], "seconds": round(ppl["seconds"], 1), "kernels": kinds(model),
            "first_window_logits": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", default=DEFAULT)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/interop_smollm2")
    args = ap.parse_args()
    base = resolve("smollm2-135m")
    windows = data.eval_windows(data.tokenize_corpus(loading.load_tokenizer(base), data.load_text("wiki")), 2048, args.windows)
    work = Path(tempfile.mkdtemp(prefix="llmq-interop-"))
    rows = []
    try:
        for path in args.recipes:
            recipe = llmq.Recipe.from_yaml(path).to_dict()
            recipe["eval"] = None
            src = work / recipe["name"]
            t = time.perf_counter()
            llmq.run(recipe, output_dir=src)
            row = {"recipe": path, "scheme": recipe["scheme"], "method": recipe["method"]["name"],
                   "quantize_s": round(time.perf_counter() - t, 1)}
            ref = evaluate(llmq.load(src, dtype=torch.float32), windows, "llmq")
            row["llmq"] = {k: v for k, v in ref.items() if k != "first_window_logits"}
            for fmt in ("gptq", "compressed-tensors"):
                t = time.perf_counter()
                try:
                    done = formats.export_checkpoint(src, work / f"{src.name}-{fmt}", fmt, 1)
                except BadInputError as e:  # zero point 0 somewhere: GPTQ v1 cannot hold it
                    row[f"{fmt}_v1_refused"] = str(e)
                    done = formats.export_checkpoint(src, work / f"{src.name}-{fmt}", fmt, 2)
                entry = {"format": done.format, "export_s": round(time.perf_counter() - t, 1)}
                t = time.perf_counter()
                back = formats.import_checkpoint(done.output_dir, work / f"{src.name}-{fmt}-back")
                entry["import_s"] = round(time.perf_counter() - t, 1)
                a, b = tensors(src), tensors(back.output_dir)
                entry["round_trip_byte_identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                try:
                    model = AutoModelForCausalLM.from_pretrained(done.output_dir, dtype=torch.float32).eval()
                except Exception as e:  # noqa: BLE001 — the peer's loader failing is a result to record
                    entry["transformers_load"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                else:
                    got = evaluate(model, windows, fmt)
                    diff = (got.pop("first_window_logits") - ref["first_window_logits"]).abs().max().item()
                    entry.update(got, max_abs_logit_diff=diff, max_abs_logit=ref["first_window_logits"].abs().max().item())
                    del model
                row[fmt] = entry
            rows.append(row)
            print(json.dumps(row, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"windows": args.windows, "seqlen": 2048, "llmq": llmq.__version__, "torch": torch.__version__}
    for pkg in ("transformers", "optimum", "gptqmodel", "compressed-tensors"):
        meta[pkg] = version(pkg)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(rows, meta, args.windows))
    print(render(rows, meta, args.windows))


def render(rows: list[dict], meta: dict, windows: int) -> str:
    def cell(e: dict) -> str:
        return f"{e['ppl']:.3f}" if "ppl" in e else ("load failed: " + e["transformers_load"].split(":")[1].strip() if "transformers_load" in e else "-")

    def delta(e: dict) -> str:
        return f"{e['max_abs_logit_diff']:.2g} of {e['max_abs_logit']:.1f}" if "ppl" in e else "-"

    lines = [
        f"Command: `python benchmarks/interop_smollm2.py` — wiki, {windows} x 2048 tokens, fp32, 2 CPU cores. {meta}",
        "",
        "| recipe | llmq ppl | GPTQ export (loader kernel) | GPTQ ppl | max logit Δ | CT ppl | max logit Δ | round trips byte-identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, c = r["gptq"], r["compressed-tensors"]
        lines.append(f"| {r['recipe']} | {r['llmq']['ppl']:.3f} | {g['format']} ({', '.join(g.get('kernels', []))}) | {cell(g)} | "
                     f"{delta(g)} | {cell(c)} | {delta(c)} | {g['round_trip_byte_identical'] and c['round_trip_byte_identical']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
