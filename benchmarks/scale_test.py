"""Scale test: quantize a random Llama-shaped checkpoint larger than 4 GB with bounded memory.

Builds (once) a random fp32 Llama checkpoint, written shard by shard so building it needs little memory either,
then runs llmq's block-by-block GPTQ (or block-wise QAT: GPTQ, then each block's scales trained toward the
full-precision block output) over it straight from disk with seeded random calibration tokens, and prints / writes
checkpoint size, wall time, seconds per block and the peak RSS sampled while quantizing.

    python benchmarks/scale_test.py [--dir /tmp/llmq-scale] [--layers 18] [--samples 8] [--seqlen 512]
    python benchmarks/scale_test.py --method qat-blockwise --epochs 1 --out benchmarks/results/scale_test_qat.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import llmq
from llmq.checkpoint.safetensors_io import INDEX
from llmq.memory import PeakRss
from llmq.quantization import blockwise

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000


def build(folder: Path, layers: int) -> int:
    """A random fp32 Llama (hidden 2048, intermediate 5632, untied embeddings), one shard per block."""
    from transformers import LlamaConfig

    if (folder / "config.json").is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    cfg.save_pretrained(tmp)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }
    n_shards = layers + 1
    weight_map = {}
    for i in range(layers):
        tensors = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        name = blockwise.shard_name(i, n_shards)
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    rest = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
        "model.norm.weight": torch.ones(HIDDEN),
    }
    name = blockwise.shard_name(layers, n_shards)
    save_file(rest, tmp / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    tmp.rename(folder)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/llmq-scale")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", choices=["gptq", "qat-blockwise"], default="gptq")
    ap.add_argument("--epochs", type=int, default=1, help="qat-blockwise: passes over the calibration batches per block")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale_test.json"))
    args = ap.parse_args()
    folder = Path(args.dir) / f"llama-{args.layers}L-fp32"
    t = time.perf_counter()
    size = build(folder, args.layers)
    build_s = time.perf_counter() - t

    gptq = {"act_order": True, "static_groups": True}
    method = {"name": "gptq", **gptq} if args.method == "gptq" else {
        "name": "qat", "mode": "blockwise", "init": "gptq", **gptq, "block_epochs": args.epochs,
        "block_lr": 0.0, "block_qparam_lr": 0.01}
    recipe = llmq.Recipe.from_dict({
        "name": "scale-test", "model": str(folder), "method": method,
        "scheme": {"bits": args.bits, "group_size": 128, "symmetric": False},
        "calibration": {"n_samples": args.samples, "seqlen": args.seqlen, "batch_size": 4}, "eval": None,
    })
    calib = torch.randint(0, VOCAB, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    work = Path(args.dir) / "quantized"
    shutil.rmtree(work, ignore_errors=True)
    with PeakRss() as peak:
        summary = blockwise.quantize_checkpoint(recipe, folder, work, torch.float16, calib)
    trained = [r for r in summary.rows if r.get("method") == "qat-block" and r["layer"] == "self_attn.q_proj"]
    result = {
        "checkpoint_gb": round(size / 1e9, 3),
        "layers": args.layers,
        "hidden": HIDDEN,
        "intermediate": INTERMEDIATE,
        "calibration": f"{args.samples} x {args.seqlen} random tokens",
        "scheme": f"W{args.bits}g128 asym, fp16 scales",
        "method": "GPTQ act_order+static_groups" + (
            f", then block-wise QAT of the scales, {args.epochs} epoch(s) per block" if trained else ""),
        **({"steps_per_block": trained[0]["steps"],
            "block_error_after_over_before_median": round(sorted(r["loss"] / r["init_loss"] for r in trained)[len(trained) // 2], 4)}
           if trained else {}),
        "build_s": round(build_s, 1),
        "quantize_s": round(summary.seconds, 1),
        "seconds_per_block": round(summary.seconds / args.layers, 2),
        "rss_gb_at_start": round(peak.start / 2**30, 3),
        "peak_rss_gb_while_quantizing": round(peak.bytes / 2**30, 3),
        "output_gb": round(sum(f.stat().st_size for f in work.glob("*.safetensors")) / 1e9, 3),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
