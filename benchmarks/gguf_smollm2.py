"""llmq's GGUF exports against llama.cpp's own quantizer, with llama.cpp computing every perplexity (SmolLM2-135M).

    python benchmarks/gguf_smollm2.py [--windows 16]

1. llmq checkpoints on the Q4_0 grid: `recipes/gguf-q4_0.yaml` (GPTQ) and the same scheme with RTN; llmq's own exact
   fp32 perplexity of each (wiki, 16 x 2048, llmq's windows).
2. `llmq export --format gguf` of each (token embeddings in F16, the checkpoint's own values; for GPTQ also in Q8_0,
   the type llama.cpp's Q4_0 gives SmolLM2's embeddings), and of the base in F32.
3. llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python) on that F32 base: Q4_0 and Q4_K_M.
4. llama.cpp's perplexity of every file from its own logits, on the same token windows (llmq's tokenizer).
Writes benchmarks/results/gguf_smollm2.json and .md. Needs llama-cpp-python (the test extra builds it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "out" / "gguf-bench"


def llmq_checkpoint(method: str) -> Path:
    import llmq

    target = WORK / f"llmq-{method}-q4_0"
    if not (target / "config.json").is_file():
        recipe = yaml.safe_load((ROOT / "recipes" / "gguf-q4_0.yaml").read_text())
        recipe.update(name=f"gguf-q4_0-{method}", eval=None)
        if method == "rtn":
            recipe["method"] = {"name": "rtn"}
        llmq.run(recipe, output_dir=target)
    return target


def windows(n: int) -> torch.Tensor:
    from llmq import data, loading
    from llmq.model.resolve import resolve

    tok = loading.load_tokenizer(resolve("smollm2-135m"))
    return data.eval_windows(data.tokenize_corpus(tok, data.load_text("wiki")), 2048, n)


def llmq_ppl(folder: Path, wins: torch.Tensor) -> dict:
    from llmq import loading
    from llmq.evaluation.perplexity import perplexity

    p = perplexity(loading.load_model(folder, dtype=torch.float32), wins, "wiki", desc=folder.name)
    return {"ppl": p.ppl, "seconds": p.seconds}


def llama_ppl(path: Path, wins: torch.Tensor) -> dict:
    """exp(mean NLL) over every predicted token of every window, from llama.cpp's logits (one context per window)."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=wins.shape[1], n_batch=512, logits_all=True, verbose=False,
                          n_threads=2)
    total, count = 0.0, 0
    for w in wins.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(w) - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
        count += len(w) - 1
    return {"ppl": math.exp(total / count), "seconds": time.perf_counter() - t0}


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    if dst.exists():
        dst.unlink()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src}")


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    out: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def main() -> None:
    import llama_cpp

    from llmq.formats import export_checkpoint
    from llmq.model.resolve import resolve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=16)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    wins = windows(args.windows)
    rows = []
    base_f32 = WORK / "base-f32.gguf"
    export_checkpoint(resolve("smollm2-135m"), base_f32, "gguf", embeddings="f32", tokenizer_pre="smollm", overwrite=True)
    files = {"base F32 (llmq export)": (base_f32, None)}
    for method, embeddings in (("gptq", "f16"), ("gptq", "q8_0"), ("rtn", "f16")):
        ckpt = llmq_checkpoint(method)
        out = WORK / f"llmq-{method}-q4_0-{embeddings}.gguf"
        export_checkpoint(ckpt, out, "gguf", embeddings=embeddings, tokenizer_pre="smollm", overwrite=True)
        # llmq's own perplexity is of the same weights only with the checkpoint's own (fp16) embeddings
        files[f"llmq {method.upper()} W4 g32 sym -> Q4_0, embeddings {embeddings.upper()}"] = (out, ckpt if embeddings == "f16" else None)
    for label, ftype in (("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        out = WORK / f"llamacpp-{label.lower()}.gguf"
        llama_quantize(base_f32, out, ftype)
        files[f"llama.cpp's own {label} of the base"] = (out, None)
    for label, (path, ckpt) in files.items():
        row = {"file": label, "size_mb": path.stat().st_size / 1e6, "types": tensor_types(path),
               "llama_cpp": llama_ppl(path, wins)}
        if ckpt is not None:
            row["llmq"] = llmq_ppl(ckpt, wins)
            row["llama_cpp_vs_llmq"] = row["llama_cpp"]["ppl"] / row["llmq"]["ppl"] - 1
        print(json.dumps(row))
        rows.append(row)
    result = {"windows": args.windows, "seqlen": 2048, "corpus": "wiki", "llama_cpp_python": llama_cpp.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (RESULTS / "gguf_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# GGUF exports vs llama.cpp's quantizer (SmolLM2-135M-Instruct)", "",
             f"`python benchmarks/gguf_smollm2.py` ({result['date']}, llama-cpp-python {llama_cpp.__version__}): "
             f"perplexity from llama.cpp's logits, wiki, {args.windows} x 2048 tokens (llmq's windows).", "",
             "| file | size MB | tensor types | llama.cpp ppl | llmq ppl (same weights) | llama.cpp vs llmq |", "|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        ours = f"{r['llmq']['ppl']:.3f}" if "llmq" in r else ""
        diff = f"{100 * r['llama_cpp_vs_llmq']:+.2f}%" if "llmq" in r else ""
        lines.append(f"| {r['file']} | {r['size_mb']:.1f} | {types} | {r['llama_cpp']['ppl']:.3f} | {ours} | {diff} |")
    (RESULTS / "gguf_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
