"""llmq's K-quant exports (method.gguf_grid) against llama.cpp's own K-quant mixes, llama.cpp computing every
perplexity (SmolLM2-135M).

    python benchmarks/gguf_kquant_smollm2.py [--windows 16]

1. `recipes/gguf-q3_k-mix.yaml` (GPTQ; mlp.down_proj 3-bit on the Q3_K grid, the 576-wide layers 4-bit on Q4_0's)
   and the same recipe with down_proj 2-bit on the Q2_K grid; llmq's own exact fp32 perplexity of each.
2. `llmq export --format gguf` of each: token embeddings in Q8_0 (the type llama.cpp gives SmolLM2's tied table),
   and for the Q3_K mix also in F32 (the checkpoint's own values: llama.cpp and llmq then score the same weights).
3. llama.cpp's own Q3_K_S, Q3_K_M and Q2_K of the F32 base (`llama_model_quantize`).
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


def mix_checkpoint(down_bits: int) -> tuple[Path, float]:
    """The gguf-q3_k-mix recipe with down_proj at `down_bits` (3: as written; 2: Q2_K), made once; its quantize seconds."""
    import llmq

    name = f"llmq-gptq-q{down_bits}_k-mix"
    target = WORK / name
    report = target / "report.json"
    if not report.is_file():
        recipe = yaml.safe_load((ROOT / "recipes" / "gguf-q3_k-mix.yaml").read_text())
        recipe.update(name=name, eval=None)
        recipe["overrides"][0]["bits"] = down_bits
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
    for bits in (3, 2):
        ckpt, seconds = mix_checkpoint(bits)
        for embeddings in ("q8_0", "f32") if bits == 3 else ("q8_0",):
            out = WORK / f"{ckpt.name}-{embeddings}.gguf"
            export_checkpoint(ckpt, out, "gguf", embeddings=embeddings, tokenizer_pre="smollm", overwrite=True)
            label = "llmq GPTQ: down_proj W3g16 -> Q3_K, rest W4g32 -> Q4_0" if bits == 3 else \
                "llmq GPTQ: down_proj W2g16 -> Q2_K, rest W4g32 -> Q4_0"
            files[f"{label}, embeddings {embeddings.upper()}"] = (out, ckpt if embeddings == "f32" else None, seconds)
    base_f32 = WORK / "base-f32.gguf"
    export_checkpoint(resolve("smollm2-135m"), base_f32, "gguf", embeddings="f32", tokenizer_pre="smollm", overwrite=True)
    for label in ("Q3_K_S", "Q3_K_M", "Q2_K"):
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
             "| file | size MB | tensor types | llama.cpp ppl | llmq ppl (same weights) | llama.cpp vs llmq |", "|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        ours = f"{r['llmq']['ppl']:.3f}" if "llmq" in r else ""
        diff = f"{100 * r['llama_cpp_vs_llmq']:+.2f}%" if "llmq" in r else ""
        lines.append(f"| {r['file']} | {r['size_mb']:.1f} | {types} | {r['llama_cpp']['ppl']:.3f} | {ours} | {diff} |")
    (RESULTS / "gguf_kquant_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
