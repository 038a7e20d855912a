"""Does llmq's sensitivity rank layers as the model's output does? On SmolLM2-135M, for 32 layers (4 kinds x 8
blocks), quantize that one layer alone (RTN W2g64) and measure the KL of the final next-token distribution to the
full-precision model's on two calibration windows; compare (Spearman rank correlation) with the layer's llmq score
for W2g64 (quantization/sensitivity.py) and with the plain squared block-output error that it replaced.

    python benchmarks/sensitivity_check_smollm2.py [--out benchmarks/results/sensitivity_check_smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import llmq
from llmq.calibration import calibration_batches, capture_inputs
from llmq.loading import load_model, load_tokenizer
from llmq.methods.rtn import quantize_weight
from llmq.model.resolve import resolve
from llmq.numerics import Scheme, dequantize
from llmq.quantization import sensitivity

HERE = Path(__file__).parent
BLOCKS = (0, 1, 3, 7, 12, 18, 24, 29)
KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
COARSE = Scheme(2, 64)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "sensitivity_check_smollm2.json"))
    args = ap.parse_args()
    recipe = llmq.Recipe.from_yaml(HERE.parent / "recipes" / "gptq-budget-3.55bpw.yaml")
    base = resolve(recipe.model)
    calib = calibration_batches(recipe.calibration, load_tokenizer(base))
    windows = calib[: sensitivity.GAIN_WINDOWS]
    model = load_model(base, dtype=torch.float32).eval()
    names = [f"model.layers.{b}.{k}" for b in BLOCKS for k in KINDS]
    ref = F.log_softmax(model(windows).logits.float(), -1)
    kl, plain = {}, {}
    for name in names:
        layer = model.get_submodule(name)
        w = layer.weight.data.clone()
        layer.weight.data = dequantize(quantize_weight(w, COARSE, recipe.method, torch.float32), COARSE)
        lp = F.log_softmax(model(windows).logits.float(), -1)
        kl[name] = float((ref.exp() * (ref - lp)).sum(-1).mean())
        layer.weight.data = w
    inputs = capture_inputs(model, model.model.layers[0], [windows], "cpu")
    for i, block in enumerate(model.model.layers):  # the plain squared block-output error, for comparison
        out0 = inputs.outputs(block)[0]
        for name in [n for n in names if n.startswith(f"model.layers.{i}.")]:
            layer = model.get_submodule(name)
            w = layer.weight.data.clone()
            layer.weight.data = dequantize(quantize_weight(w, COARSE, recipe.method, torch.float32), COARSE)
            plain[name] = float((inputs.outputs(block)[0] - out0).double().pow(2).sum(-1).mean())
            layer.weight.data = w
        inputs.advance(block)
    del model
    with tempfile.TemporaryDirectory() as cache:  # measured afresh, not from the user's cache
        import os
        os.environ["LLMQ_CACHE"] = cache
        scores, facts = sensitivity.measure(recipe, base, calib, [COARSE], names, torch.float32, torch.device("cpu"))
    llmq_scores = {n: scores[n][0] for n in names}
    result = {
        "layers": {n: {"kl": kl[n], "llmq_score": llmq_scores[n], "plain_block_mse": plain[n]} for n in names},
        "spearman_llmq_vs_kl": spearman([kl[n] for n in names], [llmq_scores[n] for n in names]),
        "spearman_plain_vs_kl": spearman([kl[n] for n in names], [plain[n] for n in names]),
        "windows": list(windows.shape), "candidate": "W2g64 RTN", "sensitivity_seconds": facts["seconds"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}))


if __name__ == "__main__":
    main()
