"""llmq's K-quant exports (method.gguf_grid) against llama.cpp's own K-quant mixes, llama.cpp computing every
perplexity (SmolLM2-135M).

    python benchmarks/gguf_kquant_smollm2.py [--windows 16]

1. GPTQ recipes on llama.cpp's grids: `recipes/gguf-q4_k_m.yaml` (the tensor types of llama.cpp's Q4_K_M, token
   table included), `recipes/gguf-q3_k-mix.yaml` (mlp.down_proj 3-bit on the Q3_K grid, the 576-wide layers 4-bit on
   Q4_0's) and the same with down_proj 2-bit on the Q2_K grid. llmq's own exact fp32 perplexity of the Q4_K_M one
   (its file holds exactly the checkpoint's weights, token table included).
2. `llmq export --format gguf` of each (full-precision token tables in Q8_0, the type llama.cpp gives SmolLM2's).
3. llama.cpp's own Q4_K_M, Q3_K_S, Q3_K_M and Q2_K of the F32 base (`llama_model_quantize`).
4. llama.cpp's perplexity of every file from its own logits, on llmq's wiki windows (16 x 2048).
Writes benchmarks/results/gguf_kquant_smollm2.{json,md}. Needs llama-cpp-python (the test extra builds it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from gguf_smollm2 import WORK, llama_ppl, llama_quantize, llmq_ppl, tensor_types, windows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# row label -> (recipe file, bits of the first override (None: as written), whether llmq's own ppl is of the same weights)
LLMQ_ROWS = {
    "llmq GPTQ, Q4_K_M types (`gguf-q4_k_m.yaml`)": ("gguf-q4_k_m.yaml", None, True),
    "llmq GPTQ: down_proj W3g16 -> Q3_K, rest W4g32 -> Q4_0 (`gguf-q3_k-mix.yaml`)": ("gguf-q3_k-mix.yaml", None, False),
    "llmq GPTQ: down_proj W2g16 -> Q2_K, rest W4g32 -> Q4_0": ("gguf-q3_k-mix.yaml", 2, False),
}


def checkpoint(recipe_file: str, override_bits: int | None) -> tuple[Path, float]:
    """The recipe's checkpoint (made once, evaluation off) and its quantize seconds."""
    import llmq

    recipe = yaml.safe_load((ROOT / "recipes" / recipe_file).read_text())
    name = recipe["name"] + (f"-down{override_bits}" if override_bits else "")
    target = WORK / f"llmq-{name}"
    report = target / "report.json"
    if not report.is_file():
        recipe.update(name=name, eval=None)
        if override_bits:
            recipe["overrides"][0]["bits"] = override_bits
        llmq.run(recipe, output_dir=target)
    return target, json.loads(report.read_text())["timings"]["quantize_s"]


def main() -> None:
    import llama_cpp

    from llmq.formats import export_checkpoint
    from llmq.model.resolve import resolve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=16)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    wins = windows(args.windows)
    files: dict[str, tuple[Path, Path | None, float | None]] = {}
    for label, (recipe_file, bits, same_weights) in LLMQ_ROWS.items():
        ckpt, seconds = checkpoint(recipe_file, bits)
        out = WORK / f"{ckpt.name}.gguf"
        export_checkpoint(ckpt, out, "gguf", embeddings="q8_0", tokenizer_pre="smollm", overwrite=True)
        files[label] = (out, ckpt if same_weights else None, seconds)
    base_f32 = WORK / "base-f32.gguf"
    export_checkpoint(resolve("smollm2-135m"), base_f32, "gguf", embeddings="f32", tokenizer_pre="smollm", overwrite=True)
    for label in ("Q4_K_M", "Q3_K_S", "Q3_K_M", "Q2_K"):
        out = WORK / f"llamacpp-{label.lower()}.gguf"
        llama_quantize(base_f32, out, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{label}"))
        files[f"llama.cpp's own {label} of the base"] = (out, None, None)
    rows = []
    for label, (path, ckpt, seconds) in files.items():
        row = {"file": label, "size_mb": path.stat().st_size / 1e6, "types": tensor_types(path),
               "llama_cpp": llama_ppl(path, wins), "quantize_s": seconds}
        if ckpt is not None:
            row["llmq"] = llmq_ppl(ckpt, wins)
            row["llama_cpp_vs_llmq"] = row["llama_cpp"]["ppl"] / row["llmq"]["ppl"] - 1
        print(json.dumps(row))
        rows.append(row)
    result = {"windows": args.windows, "seqlen": 2048, "corpus": "wiki", "llama_cpp_python": llama_cpp.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (RESULTS / "gguf_kquant_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# K-quant GGUF exports vs llama.cpp's own K-quant mixes (SmolLM2-135M-Instruct)", "",
             (f"`python benchmarks/gguf_kquant_smollm2.py` ({result['date']}, llama-cpp-python {llama_cpp.__version__}): "
              f"perplexity from llama.cpp's logits, wiki, {args.windows} x 2048 tokens (llmq's windows)."), "",
             "| file | size MB | tensor types | llama.cpp ppl | llmq ppl (same weights) | llama.cpp vs llmq | method s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        ours = f"{r['llmq']['ppl']:.3f}" if "llmq" in r else ""
        diff = f"{100 * r['llama_cpp_vs_llmq']:+.2f}%" if "llmq" in r else ""
        seconds = "" if r["quantize_s"] is None else f"{r['quantize_s']:.0f}"
        lines.append(f"| {r['file']} | {r['size_mb']:.1f} | {types} | {r['llama_cpp']['ppl']:.3f} | {ours} | {diff} | {seconds} |")
    (RESULTS / "gguf_kquant_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
