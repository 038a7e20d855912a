"""Block-wise QAT (EfficientQAT's Block-AP): train one decoder block's quantization on cached activations.

`qat_block` is a per-block method of the block walk (`method: {name: qat, mode: blockwise}`), so it inherits the
walk's bounds and guarantees: one block and its calibration activations in memory, a shard per finished block,
resume after a kill, the same bytes for the same recipe. For one block:

1. target: the block's full-precision output on its inputs (the quantized previous blocks' outputs, as the walk
   feeds them);
2. init: the recipe's `init` method (rtn or gptq) on this block;
3. prepare: its targeted Linear layers become `FakeQuantLinear`s from those QWeights (latent weights, scales and
   zero points, straight-through rounding);
4. train: AdamW on the mean squared error between the block's output and the target, `block_epochs` passes over
   the calibration batches in their fixed order (deterministic);
5. convert: exact integers (`FakeQuantLinear.to_qweight`), and their dequantized weights written back into the
   block's Linear layers, so that the next block is fed this block's quantized output.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import numerics
from ...calibration.capture import first_output
from ...errors import LlmqError
from ...numerics import QWeight
from ..job import BlockJob
from .fake_quant import FakeQuantLinear, convert, prepare

BlockMethod = Callable[[nn.Module, list[str], BlockJob], dict[str, QWeight]]


def block_mse(block: nn.Module, job: BlockJob, targets: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs against `targets`, over every calibration batch."""
    outs = job.inputs.outputs(block)
    return float(sum(F.mse_loss(o.float(), t.float(), reduction="sum") for o, t in zip(outs, targets))
                 / sum(t.numel() for t in targets))


def qat_block(block: nn.Module, names: list[str], job: BlockJob, init: BlockMethod) -> dict[str, QWeight]:
    """Block-AP on the named Linear layers of one block (see the module docstring), starting from the block method
    `init` (the registry's rtn or gptq); {name: QWeight}."""
    if job.inputs is None:
        raise LlmqError("block-wise QAT needs calibration activations for every block")
    t0 = time.perf_counter()
    targets = job.inputs.outputs(block)
    qweights = init(block, names, job)
    prepare(block, qweights, {n: job.scheme_for(n) for n in qweights}, job.scale_dtype, job.config)
    init_loss = block_mse(block, job, targets)  # the fake-quant block computes exactly the init's quantized block
    _train(block, job, targets)
    trained = convert(block)
    for name in names:  # back to plain Linear layers holding the exact dequantized weights
        fake = block.get_submodule(name)
        block.set_submodule(name, _linear(fake, numerics.dequantize(trained[name], job.scheme_for(name))))
    loss = block_mse(block, job, targets)
    seconds = (time.perf_counter() - t0) / max(len(names), 1)
    for name in names:
        job.log({"layer": name, "method": "qat-block", "loss": loss, "init_loss": init_loss, "seconds": seconds})
    return trained


def _linear(fake: FakeQuantLinear, weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(fake.in_features, fake.out_features, bias=fake.bias is not None, device=weight.device)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if fake.bias is not None:
        layer.bias = nn.Parameter(fake.bias.detach().clone(), requires_grad=False)
    return layer


def _train(block: nn.Module, job: BlockJob, targets: list[torch.Tensor]) -> None:
    """AdamW on the block's output error: latent weights at `block_lr`, scales and zero points at `block_qparam_lr`."""
    cfg = job.config
    weights = [p for n, p in block.named_parameters() if p.requires_grad and n.endswith(".weight")]
    qparams = [p for n, p in block.named_parameters() if p.requires_grad and not n.endswith(".weight")]
    groups = [{"params": weights, "lr": cfg.block_lr}, {"params": qparams, "lr": cfg.block_qparam_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    block.train()
    with torch.enable_grad():
        for _ in range(cfg.block_epochs):
            for h, (args, kwargs), target in zip(job.inputs.hidden, job.inputs.extras, targets):
                loss = F.mse_loss(first_output(block(h, *args, **kwargs)).float(), target.float())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    block.eval()
    block.requires_grad_(False)
