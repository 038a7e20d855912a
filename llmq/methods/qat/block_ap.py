"""Block-wise QAT: train one decoder block's quantization on cached activations (after EfficientQAT's Block-AP and
AutoRound), as a per-block method of the block walk (`method: {name: qat, mode: blockwise}`).

Being a block method, it inherits the walk's bounds and guarantees: one block and its activations in memory (the
quantized and the full-precision stream, and the block's targets), a shard per finished block, resume after a kill
to the same bytes, and the same bytes for the same recipe (with `block_minutes`, for the same step plans: they
depend on the machine's speed, re-planned after each block; a resumed run keeps the plan its first run had made for
the block it resumes at). For one block:

1. target: the full-precision model's output of this block (`job.targets`: the walk carries the full-precision
   activations beside the quantized ones), so each block also learns to undo the error the quantized blocks
   before it left in its input;
2. init: the recipe's `init` method (rtn or gptq) on this block, calibrated on the quantized inputs as usual;
3. prepare: its targeted Linear layers become `RoundingLinear`s holding the init's integer codes; what trains is
   a rounding offset per weight (a code moves once its offset crosses ±0.5) and the scales (in log space);
4. train: Adam on the mean squared error between the block's output on the quantized inputs and the target,
   `steps` passes of one calibration batch each, in a fixed order (deterministic), learning rates decaying
   linearly to zero;
5. convert: exact integers (`RoundingLinear.to_qweight`), written back into the block's Linear layers as their
   dequantized weights; the activations are then advanced through the quantized block here, and that one pass
   gives both the next block's inputs and the error after training (`job.advanced`: the walk does not advance again).

Why not the latent-weight fake quantization of whole-model QAT: GPTQ leaves every weight exactly on its grid,
where LSQ's scale gradient is zero and Adam turns the remaining noise into steps of a full learning rate; measured
on SmolLM2 W3g64 that made the block error worse than its GPTQ start (benchmarks/results/qat_blockwise_smollm2.json).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import numerics
from ...calibration.capture import first_output
from ...errors import LlmqError
from ...numerics import QWeight
from ..job import BlockJob
from .fake_quant import RoundingLinear

logger = logging.getLogger(__name__)

BlockMethod = Callable[[nn.Module, list[str], BlockJob], dict[str, QWeight]]
SAFETY = 0.97  # of the time a plan may spend: step times drift and the method ends with writing files


@dataclass
class StepBudget:
    """`block_minutes` as a number of training steps per block. Planned on the first block trained, from what that
    block measured (its init, an evaluation pass, four timed steps on a throw-away copy), then re-planned after
    every block trained, from the time its steps really took and the time left, for the blocks after it. The walk
    records the plan in force and the seconds spent with each finished block, so a resumed run trains its next block
    exactly as the uninterrupted run would have, and the budget still covers the whole method."""

    seconds: float  # the whole method's wall clock
    n_blocks: int
    started: float  # time.perf_counter() when the method started (a resumed run: minus what the first run spent)
    steps: int | None = None  # the plan for the next block that trains, once made (or restored on resume)
    step_s: float | None = None  # the seconds a step took when last measured (what a block given no steps re-plans from)

    def plan(self, blocks_left: int, init_s: float, eval_s: float, step_s: float, trained_here: bool = False) -> int:
        """Steps per block so that the rest fits. Before this block trains (`trained_here` False), `blocks_left`
        counts it: it still trains and evaluates once (its advance, which also gives the loss after), and each later
        block also computes its targets, its init and its loss before training. After it trained, `blocks_left`
        counts the blocks after it only, and this block's advance is still to come."""
        self.step_s = step_s
        left = self.seconds * SAFETY - (time.perf_counter() - self.started)
        later = blocks_left if trained_here else blocks_left - 1
        fixed = eval_s + later * (3 * eval_s + init_s)
        self.steps = max(0, int((left - fixed) / (max(blocks_left, 1) * max(step_s, 1e-6))))
        log = logger.debug if trained_here else logger.info  # the first plan is news; re-plans are routine
        log(f"block-wise QAT: {self.steps} training steps per block fit what is left of "
            f"{self.seconds / 60:g} minutes for {blocks_left} block(s) ({step_s:.2f} s a step, "
            f"{init_s:.1f} s init and {eval_s:.2f} s per evaluation pass per block)")
        return self.steps


@torch.no_grad()
def stream_mse(outputs: Iterable[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error of `outputs` against `targets`, over every batch (`outputs` may be a generator: one batch's
    output in memory at a time)."""
    total = sum(F.mse_loss(o.float(), t.float(), reduction="sum") for o, t in zip(outputs, targets))
    return float(total / sum(t.numel() for t in targets))


@torch.no_grad()
def block_mse(block: nn.Module, job: BlockJob, targets: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs (on the quantized inputs) against `targets`, over every batch."""
    return stream_mse((first_output(block(h, *a, **k)) for h, (a, k) in zip(job.inputs.hidden, job.inputs.extras)),
                      targets)


def qat_block(block: nn.Module, names: list[str], job: BlockJob, init: BlockMethod) -> dict[str, QWeight]:
    """Block-wise QAT of the named Linear layers of one block (see the module docstring), starting from the block
    method `init` (the registry's rtn or gptq); {name: QWeight}."""
    if job.inputs is None:
        raise LlmqError("block-wise QAT needs calibration activations for every block")
    t0 = time.perf_counter()
    targets = job.targets if job.targets is not None else job.inputs.outputs(block)
    qweights = init(block, names, job)
    for name, qw in qweights.items():
        block.set_submodule(name, RoundingLinear(block.get_submodule(name), qw, job.scheme_for(name), job.scale_dtype,
                                                 job.config))
    init_s = time.perf_counter() - t0
    t = time.perf_counter()
    init_loss = block_mse(block, job, targets)  # exactly the init's quantized block
    eval_s = time.perf_counter() - t
    steps = _steps(block, job, targets, init_s, eval_s)
    t = time.perf_counter()
    train_block(block, job, targets, steps)
    budget = job.step_budget
    if budget is not None and job.blocks_left > 1:  # re-plan the rest from what this block's steps took
        # a block given no steps (a slow stretch used its share) re-plans from the last step time known, so the
        # blocks after it train again once the machine is back to speed
        step_s = (time.perf_counter() - t) / steps if steps > 0 else budget.step_s
        if step_s is not None:
            budget.plan(job.blocks_left - 1, init_s, eval_s, step_s, trained_here=True)
    trained = {name: block.get_submodule(name).to_qweight() for name in qweights}
    for name, qw in trained.items():  # back to plain Linear layers holding the exact dequantized weights
        layer = block.get_submodule(name)
        block.set_submodule(name, _linear(layer, numerics.dequantize(qw, job.scheme_for(name), layer.weight_dtype)))
    # the trained block's output is the next block's input: advancing the walk's activations here gives the error
    # after training from the same pass (the walk then skips its own advance: `job.advanced`)
    job.inputs.advance(block)
    job.advanced = True
    loss = stream_mse(job.inputs.hidden, targets)
    seconds = (time.perf_counter() - t0) / max(len(names), 1)
    for name in names:
        job.log({"layer": name, "method": "qat-block", "loss": loss, "init_loss": init_loss, "steps": steps,
                 "seconds": seconds})
    return trained


def _steps(block: nn.Module, job: BlockJob, targets: list[torch.Tensor], init_s: float, eval_s: float) -> int:
    """This block's training steps: `block_epochs` passes over the batches, or the time budget's plan (made here
    on the first block, by timing four steps on a copy of the block)."""
    budget = job.step_budget
    if budget is None:
        return job.config.block_epochs * len(targets)
    if not any(isinstance(m, RoundingLinear) for m in block.modules()):
        return 0  # nothing to train here (and nothing to time: the plan waits for a block that trains)
    if budget.steps is None:
        trial = copy.deepcopy(block)
        train_block(trial, job, targets, 2)  # the first steps pay for allocations: not timed
        t = time.perf_counter()
        train_block(trial, job, targets, 4)
        del trial
        budget.plan(job.blocks_left, init_s, eval_s, (time.perf_counter() - t) / 4)
    return budget.steps


def _linear(layer: RoundingLinear, weight: torch.Tensor) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    out.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().to(weight.dtype), requires_grad=False)
    return out


def training_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The training forward's precision: bf16 autocast on a GPU (tensor cores; the loss, the scales and Adam stay
    fp32), plain fp32 elsewhere (bf16 autocast on a CPU was not measured, so the CPU keeps what the numbers in the
    README were made with). Evaluation passes and the conversion to integers run outside it, in the block's dtype."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_block(block: nn.Module, job: BlockJob, targets: list[torch.Tensor], steps: int) -> None:
    """Adam on the block's output error for `steps` steps, one calibration batch each (cycling in order): rounding
    offsets at `block_lr` (grid steps), log scales at `block_qparam_lr`; both decay linearly to zero."""
    cfg = job.config
    block.requires_grad_(False)
    offsets = [m.offsets for m in block.modules() if isinstance(m, RoundingLinear) and cfg.train_weights]
    scales = [m.log_scales for m in block.modules() if isinstance(m, RoundingLinear) and cfg.learn_scales]
    groups = [{"params": offsets, "lr": cfg.block_lr}, {"params": scales, "lr": cfg.block_qparam_lr}]
    groups = [g for g in groups if g["params"] and g["lr"] > 0]
    if steps <= 0 or not groups:
        return
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    batches = list(zip(job.inputs.hidden, job.inputs.extras, targets))
    with torch.enable_grad(), training_autocast(batches[0][0].device):
        for step in range(steps):
            h, (args, kwargs), target = batches[step % len(batches)]
            loss = F.mse_loss(first_output(block(h, *args, **kwargs)).float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    block.requires_grad_(False)
