"""Probe for block-wise QAT variants (issue 16): the first K decoder blocks of SmolLM2-135M quantized the way
recipes/qat-w3g64.yaml does (GPTQ, then the block training), the rest left in full precision; per block the relative
error of its output on 16 held-out lambada windows (calibration seed 123, never trained on) and on the calibration
windows; at the end the wiki perplexity of that partly quantized model on 4 x 2048 tokens (fp32). A few minutes
per variant on 2 CPU cores, where a full recipe takes 18.

    python benchmarks/qat_block_probe.py K '{"batch_size": 1}'

Variant keys: any key of the recipe's `method` section (e.g. `block_qparam_lr`, `block_epochs`, `block_lr`),
`batch_size` (calibration windows per training step), `n_samples`, `seqlen` (calibration window length; the
held-out windows stay the recipe's 512), `train: false` (GPTQ only), and two
experiments that are not recipe keys: `norm_lr` (the block's RMSNorm weights train too, at this Adam rate, rounded
to fp16 afterwards as the checkpoint stores them), `token_normalized: true` (each token's squared error divided by
its target's mean square, so tokens with huge hidden states do not dominate the loss).

Measured 2026-12-03 (2 CPU cores, K = 4; block 3's held-out error, then wiki ppl of the partly quantized model):
GPTQ only 0.01815, 22.571; the recipe as it was (4 windows a step, 2 epochs = 32 steps) 0.01450, 22.450;
`norm_lr` 0.001: 0.01441 (block errors only); `norm_lr` 0.005: 0.01521 (worse); `token_normalized`: 0.01452,
22.453; `block_epochs: 4` (64 steps, 1.8x the time): 0.01424 (block errors only); 2 windows a step (64 steps):
0.01409, 22.434; 1 window a step (128 steps of 512 tokens, 1.2x the time): 0.01393, 22.291.
Measured 2026-12-04, long calibration windows (the same 32k tokens as 16 windows of 2048, so attention is calibrated
past position 512; 1 window a step, 32 steps): GPTQ only 0.01904, 22.476; trained 0.01490, 22.234. Wiki (2,048-token
windows) gains ~0.06-0.1 ppl over 512-token windows, the 512-token held-out error loses ~7%. The whole W3g64 recipe
with these windows lost (wiki 33.081 against 31.412 and 31.753 in two runs of the shipped recipe: 29 steps per block
of 2,048 tokens where 512-token steps gave 99-105).
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq import data
from llmq.calibration import calibration_batches, capture_inputs, linear_clusters
from llmq.calibration.capture import first_output
from llmq.evaluation.perplexity import window_nll
from llmq.methods.gptq import gptq_block
from llmq.methods.job import BlockJob
from llmq.methods.qat import block_ap
from llmq.model.resolve import resolve
from llmq.recipe import Recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "qat-w3g64.yaml"


def pooled_relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Σ|Δy|² / Σ|y|² over every token of every batch: the number the README quotes. (Not the sensitivity
    planner's `relative_error`, which averages the ratio per token.)"""
    return float(sum(((o - t) ** 2).sum() for o, t in zip(outputs, targets)) / sum((t ** 2).sum() for t in targets))


def with_norms_trained(lr: float):
    """block_ap.train_block, with the block's 1-D norm weights added to its Adam at `lr`, rounded to fp16 after."""
    train = block_ap.train_block

    def train_with_norms(block, job, targets, steps):
        norms = [m.weight for m in block.modules() if not isinstance(m, (torch.nn.Linear, block_ap.RoundingLinear))
                 and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() == 1]
        adam = torch.optim.Adam

        def adam_with_norms(groups, **kw):
            for p in norms:
                p.requires_grad_(True)
            return adam([*groups, {"params": norms, "lr": lr}], **kw)

        torch.optim.Adam = adam_with_norms
        try:
            train(block, job, targets, steps)
        finally:
            torch.optim.Adam = adam
        with torch.no_grad():
            for p in norms:
                p.copy_(p.to(torch.float16).float())
                p.requires_grad_(False)

    return train_with_norms


def token_normalized_mse(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if reduction != "mean":  # the logged block errors stay plain MSE
        return F.mse_loss(a, b, reduction=reduction)
    return ((a - b) * b.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()).pow(2).mean()


def main() -> None:
    torch.manual_seed(0)
    k, variant = int(sys.argv[1]), json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    recipe = Recipe.from_yaml(RECIPE)
    method = recipe.method.model_copy(update={"block_minutes": None, "block_epochs": 2,
                                              **{n: v for n, v in variant.items() if n in type(recipe.method).model_fields}})
    calibration = recipe.calibration.model_copy(update={n: variant[n] for n in ("n_samples", "seqlen") if n in variant})
    batch = variant.get("batch_size", 4)
    if variant.get("norm_lr"):
        block_ap.train_block = with_norms_trained(variant["norm_lr"])
    if variant.get("token_normalized"):
        block_ap.F = types.SimpleNamespace(mse_loss=token_normalized_mse)
    path = resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = model.model.layers
    train = capture_inputs(model, blocks[0], list(torch.split(calibration_batches(calibration, tokenizer), batch)), "cpu")
    held_windows = calibration_batches(recipe.calibration.model_copy(update={"seed": 123, "n_samples": 16}), tokenizer)
    held = capture_inputs(model, blocks[0], list(torch.split(held_windows, batch)), "cpu")
    reference, held_reference = [h.clone() for h in train.hidden], [h.clone() for h in held.hidden]
    clusters = linear_clusters(blocks[0], train)
    names = [n for c in clusters for n in c]
    t0 = time.perf_counter()
    for i in range(k):
        block = blocks[i]
        with torch.no_grad():
            targets = [first_output(block(h, *a, **kw)) for h, (a, kw) in zip(reference, train.extras)]
            held_targets = [first_output(block(h, *a, **kw)) for h, (a, kw) in zip(held_reference, held.extras)]
        job = BlockJob(recipe.scheme.to_scheme(), method, torch.float16, train, clusters, schemes={})
        if variant.get("train", True):
            job.targets = targets
            block_ap.qat_block(block, names, job, gptq_block)
        else:
            gptq_block(block, names, job)
        if not job.advanced:
            train.advance(block)
        held.advance(block)
        reference, held_reference = targets, held_targets
        print(f"block {i}: held-out rel error {pooled_relative_error(held.hidden, held_reference):.5f}, calibration "
              f"{pooled_relative_error(train.hidden, reference):.5f}, {time.perf_counter() - t0:.0f} s", flush=True)
    windows = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text("wiki")), 2048, 4)
    nll, n = window_nll(model, windows)
    print(f"first {k} blocks quantized: wiki ppl (4 x 2048) {math.exp(nll / n):.4f}", flush=True)


if __name__ == "__main__":
    main()
