"""GPU measurements of llmq's Triton WnA16 kernels (issue 5), for a lent H100 / H200: one script, several parts.

    python benchmarks/gpu_bench.py --out DIR --part decode prefill bits e2e

- decode / prefill: `llmq bench kernels` at W4 g128 on the issue's shapes (K x N = 4096x4096, 4096x11008,
  11008x4096, 8192x8192, 8192x28672), M = 1 and 16 (decode) or 2048 (prefill), against dense bf16 F.linear
  (cuBLAS); CUDA graphs of enough distinct weight copies that they stream from HBM; medians of interleaved rounds.
- bits: M = 1 for W8 / W3 / W2 g128 on two shapes.
- e2e: decode tokens/s of a Llama with 7B-sized layers (hidden 4096, MLP 11008, 32 heads; --layers of them,
  random bf16 weights, vocab 32000) against the same model with every decoder Linear quantized W4 g128 by RTN
  (llmq's numerics on the CPU, then QuantLinear on the GPU): greedy decoding with the KV cache, eager PyTorch,
  prompt 128, 128 new tokens, medians of 5 interleaved rounds. Random weights: speed does not depend on them.
Every part writes DIR/<part>.json and prints a table. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch


def kernels_part(out: Path, name: str, ms: list[int], bits: int, shapes=None, rounds: int = 7) -> None:
    from rich.console import Console

    from llmq import bench

    t = time.perf_counter()
    result = bench.bench_kernels(shapes, ms, bits=bits, group_size=128, device="cuda", rounds=rounds)
    result["wall_s"] = time.perf_counter() - t
    bench.write_json(result, out / f"{name}.json")
    Console(width=200).print(bench.kernels_table(result))


def splitk_part(out: Path) -> None:
    """M = 1 decode time against the number of K splits (the host's heuristic picks one), W4 g128."""
    from llmq import bench
    from llmq.kernels import triton_wna16 as tw
    from llmq.numerics import Scheme

    dev = torch.device("cuda")
    result = []
    for k, n in [(4096, 4096), (4096, 11008), (8192, 28672)]:
        copies = max(2, min(64, (256 << 20) // (k * n // 2)))
        layers = [bench._random_layer(k, n, Scheme(4, 128, False), dev, torch.bfloat16, seed=i) for i in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        fns = {}
        for split in (None, 1, 2, 4, 8, 16):
            it = bench._cycle(layers)
            fns[str(split or "auto")] = lambda it=it, split=split, x=x: tw.decode_linear(x, next(it), split)
        secs = bench.interleaved_medians(fns, 7, dev, inner=copies)
        auto = tw._default_split_k(n, k, dev)
        for name, t in secs.items():
            gbps = (k * n // 2 + k * n // 128 * 4) / t / 1e9
            result.append({"k": k, "n": n, "split": name, "auto_split": auto, "us": t * 1e6, "weight_gbps": gbps})
            print(f"K={k} N={n} split {name:>4} (auto={auto}): {t * 1e6:7.1f} us  {gbps:7.1f} GB/s of weights")
    (out / "splitk.json").write_text(json.dumps(result, indent=2) + "\n")


def e2e_part(out: Path, layers: int, new_tokens: int = 128, rounds: int = 5) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmq import bench, numerics
    from llmq.checkpoint.quant_linear import replace_linears
    from llmq.numerics import Scheme

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    t = time.perf_counter()
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    scheme = Scheme(bits=4, group_size=128, symmetric=False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    base.load_state_dict(model.state_dict())
    base = base.cuda()
    qweights = {n: numerics.quantize(model.get_submodule(n).weight.float(), scheme) for n in names}
    replace_linears(model, scheme, names, torch.bfloat16, qweights)
    model = model.cuda()
    print(f"built and quantized {len(names)} layers in {time.perf_counter() - t:.0f} s")
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)).cuda()
    rows = {"bf16 base": base, "W4 g128 (triton)": model}
    for m in rows.values():
        bench._generate_once(m, prompt, 8, torch.device("cuda"))
    times = {k: [] for k in rows}
    for _ in range(rounds):
        for k, m in rows.items():
            times[k].append(bench._generate_once(m, prompt, new_tokens, torch.device("cuda")))
    served = bench._served_by(model)
    result = {"device": torch.cuda.get_device_name(), "layers": layers, "prompt_tokens": 128, "new_tokens": new_tokens,
              "kernels": served, "rows": {}}
    for k, ts in times.items():
        pre, dec = statistics.median(a for a, _ in ts), statistics.median(b for _, b in ts)
        result["rows"][k] = {"prefill_tok_s": 128 / pre, "decode_tok_s": new_tokens / dec,
                             "weights_gb": bench._model_bytes(rows[k]) / 2**30, "rounds": ts}
    base_tok = result["rows"]["bf16 base"]["decode_tok_s"]
    for k, r in result["rows"].items():
        r["decode_speedup"] = r["decode_tok_s"] / base_tok
        print(f"{k:>18}: prefill {r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.1f} tok/s "
              f"({r['decode_speedup']:.2f}x)  weights {r['weights_gb']:.2f} GiB")
    print("kernels:", served)
    (out / "e2e.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--part", nargs="+", default=["decode", "prefill", "bits", "e2e"])
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # llmq bench progress lines
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name())
    for part in args.part:
        t = time.perf_counter()
        if part == "decode":
            kernels_part(out, "decode_w4", [1, 16], 4)
        elif part == "prefill":
            kernels_part(out, "prefill_w4", [2048], 4, rounds=5)
        elif part == "bits":
            for bits in (8, 3, 2):
                kernels_part(out, f"decode_w{bits}", [1], bits, shapes=[(4096, 4096), (4096, 11008)])
        elif part == "splitk":
            splitk_part(out)
        elif part == "e2e":
            e2e_part(out, args.layers)
        print(f"part {part}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
