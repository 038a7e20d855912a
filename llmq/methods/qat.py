"""Quantization-aware training: a short fine-tune that recovers what PTQ loses, in three steps.

1. prepare: the targeted Linear layers become `FakeQuantLinear`s, started from a PTQ result (`init: rtn | gptq`:
   the weights, scales and zero points that method chose). Their forward is `numerics.fake_quantize_learnable`,
   i.e. exactly `dequantize(quantize(w))`, with straight-through rounding so the latent weights and (LSQ-style)
   the scales and zero points can learn.
2. train: training.py's loop (distillation from the full-precision model by default).
3. convert: `numerics.quantize` of the trained weights with the trained scales and (rounded) zero points — the
   same QWeights a PTQ method returns, packed into the same format. The converted model computes exactly what
   the fake-quant model computed (zero tolerance, tested).

Only the targeted Linear layers train; embeddings, norms and the (ignored) lm_head keep the base model's values.
Unlike RTN and GPTQ this method needs the whole model in memory (a forward and backward pass through all of it),
so it does not use blockwise.py's one-block-at-a-time walk on disk — only, in memory, for its initialisation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import numerics, training
from ..errors import LlmqError
from ..numerics import QWeight, Scheme
from ..recipe import MethodConfig, Recipe


class FakeQuantLinear(nn.Module):
    """A Linear layer that trains through its quantization: latent fp32 weight, scales and zero points as
    parameters (frozen or not), forward on the dequantized integer weight."""

    def __init__(self, linear: nn.Linear, init: QWeight, scheme: Scheme, scale_dtype: torch.dtype, method: MethodConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme, self.scale_dtype = scheme, scale_dtype
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=method.train_weights)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        self.scales = nn.Parameter(init.scales.detach().float().clone(), requires_grad=method.learn_scales)
        zeros = None if init.zeros is None or scheme.symmetric else init.zeros.detach().float().clone()
        self.zeros = None if zeros is None else nn.Parameter(zeros, requires_grad=method.learn_zero_points)
        self.register_buffer("g_idx", None if init.g_idx is None else init.g_idx.clone())

    def stored_scales(self) -> torch.Tensor:
        """The scales as they will be stored: rounded to the checkpoint's scale dtype, kept positive."""
        return self.scales.to(self.scale_dtype).float().clamp_min(torch.finfo(self.scale_dtype).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = numerics.fake_quantize_learnable(self.weight, self.scheme, self.stored_scales(), self.zeros, self.g_idx)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_qweight(self) -> QWeight:
        """The integer weight this layer computes with: what convert packs."""
        zeros = None if self.zeros is None else torch.clamp(torch.round(self.zeros), 0, self.scheme.maxq).to(torch.int32)
        return numerics.quantize(self.weight.detach(), self.scheme, self.stored_scales().detach(), zeros, self.g_idx)

    def extra_repr(self) -> str:
        trains = [n for n, p in self.named_parameters() if p.requires_grad]
        return f"in={self.in_features}, out={self.out_features}, bits={self.scheme.bits}, trains={trains}"


def prepare(model: nn.Module, qweights: dict[str, QWeight], scheme: Scheme, scale_dtype: torch.dtype, method: MethodConfig) -> None:
    """Swap each layer named in `qweights` (nn.Linear) for a FakeQuantLinear started from its QWeight, and freeze
    every other parameter. With GPTQ's result the latent weight is its dequantized weight (what GPTQ leaves in the
    Linear layers), so the fake-quant model starts exactly at the PTQ model."""
    model.requires_grad_(False)
    for name, qw in qweights.items():
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name), qw, scheme, scale_dtype, method))


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def convert(model: nn.Module) -> dict[str, QWeight]:
    """{name: QWeight} of every FakeQuantLinear: the integers, scales and zero points the trained model uses."""
    return {name: layer.to_qweight() for name, layer in fake_quant_layers(model).items()}


@dataclass
class QatResult:
    qweights: dict[str, QWeight]
    has_g_idx: bool
    train: training.TrainStats
    init_rows: list[dict[str, Any]]  # the initialisation's per-layer rows (rtn weight error / gptq loss)
    init_seconds: float
    init_eval_seconds: float = 0.0


def init_recipe(recipe: Recipe) -> Recipe:
    """The PTQ recipe whose result QAT starts from (same scheme, clipping and GPTQ options)."""
    return recipe.model_copy(update={"method": recipe.method.model_copy(update={"name": recipe.method.init})})


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    scale_dtype: torch.dtype,
    train_windows: torch.Tensor,
    calibration: torch.Tensor | None = None,
    *,
    key: str = "in-memory",
    state_path: Path | None = None,
    started: float | None = None,
    evaluate_init: Callable[[nn.Module], None] | None = None,
    say: Callable[[str], None] = lambda msg: None,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    stop_after: int | None = None,
) -> QatResult:
    """QAT of a model in memory (fp32 weights), in place: init, prepare, train, convert. The targeted layers are
    left as FakeQuantLinear; `hf.install_quantized` turns the returned QWeights into QuantLinear layers.

    `started` (a time.perf_counter() value, default now) starts the clock of a `budget.minutes` recipe: the
    budget covers initialisation and training. `evaluate_init(model)` runs on the fake-quant model before
    training (it equals the PTQ model exactly); its time is not charged to the budget."""
    from .. import blockwise

    started = time.perf_counter() if started is None else started
    cfg = recipe.training
    teacher = copy.deepcopy(model).eval() if cfg.loss == "kd" else None
    t = time.perf_counter()
    qweights, summary = blockwise.quantize_model(model, init_recipe(recipe), scale_dtype, calibration, log)
    init_seconds = time.perf_counter() - t
    say(f"initialised from {recipe.method.init} in {init_seconds:.1f} s")
    scheme = recipe.scheme.to_scheme()
    prepare(model, qweights, scheme, scale_dtype, recipe.method)
    deadline = None if cfg.budget.minutes is None else started + cfg.budget.minutes * 60
    eval_seconds = 0.0
    if evaluate_init is not None:
        t = time.perf_counter()
        evaluate_init(model)
        eval_seconds = time.perf_counter() - t
        deadline = None if deadline is None else deadline + eval_seconds
    layer_names = set(fake_quant_layers(model))
    stats = training.fine_tune(
        model, teacher, train_windows, cfg, key=key, state_path=state_path, deadline=deadline, say=say,
        keep_in_state=lambda k: k.rpartition(".")[0] in layer_names, stop_after=stop_after,
    )
    del teacher
    if len(stats.losses) < stats.steps:
        raise LlmqError(f"stopped after step {stop_after} of {stats.steps} (as asked)")
    return QatResult(convert(model), summary.has_g_idx, stats, summary.rows, init_seconds, eval_seconds)


def quantize_checkpoint(
    recipe: Recipe,
    base_dir: Path,
    work: Path,
    scale_dtype: torch.dtype,
    train_windows: torch.Tensor,
    calibration: torch.Tensor | None = None,
    *,
    evaluate_init: Callable[[nn.Module], None] | None = None,
    say: Callable[[str], None] = lambda msg: None,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    main: bool = True,
    stop_after: int | None = None,
):
    """`llmq run` for QAT: load the base model, train it into the folder `work` (training checkpoints there, so a
    rerun resumes), and write the converted checkpoint there (main process only). Returns (QuantizeSummary,
    QatResult). `work` must be empty or hold a training state of this same recipe and base model."""
    from .. import models
    from ..blockwise import QuantizeSummary, run_key
    from ..hf import install_quantized

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / training.STATE
    if any(p.name != training.STATE for p in work.iterdir()):
        raise LlmqError(f"{work} is not empty and holds no llmq QAT state; remove it to start over")
    model = models.load_model(base_dir, dtype=torch.float32)
    done = quantize_model(
        model, recipe, scale_dtype, train_windows, calibration, key=run_key(recipe, base_dir), state_path=state_path,
        started=t0, evaluate_init=evaluate_init, say=say, log=log, stop_after=stop_after,
    )
    summary = QuantizeSummary(layers=list(done.qweights), rows=done.init_rows, has_g_idx=done.has_g_idx)
    if main:
        install_quantized(model, recipe.scheme.to_scheme(), done.qweights, scale_dtype, recipe.targets, recipe.ignore,
                          has_g_idx=done.has_g_idx)
        model.save_pretrained(work)
        state_path.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - t0 - done.init_eval_seconds
    return summary, done
