"""QAT, run: initialise from a PTQ method (the block walk, in memory), swap the targeted layers for fake-quant
layers, fine-tune (methods/qat/training.py), convert to exact integers — in memory, or from a base checkpoint into
a partial output folder that a rerun resumes from (its training state).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.hf import install_quantized
from ..errors import LlmqError
from ..loading import load_model
from ..methods.qat import convert, fake_quant_layers, init_recipe, prepare, training
from ..numerics import QWeight
from ..recipe import Recipe
from . import blockwise
from .blockwise import QuantizeSummary
from .resume import BUDGET, run_key

logger = logging.getLogger(__name__)


@dataclass
class QatResult:
    qweights: dict[str, QWeight]
    init: QuantizeSummary  # the initialisation's walk: per-layer rows (rtn weight error / gptq loss), schemes, g_idx
    train: training.TrainStats
    init_seconds: float
    init_eval_seconds: float = 0.0


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
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    stop_after: int | None = None,
) -> QatResult:
    """QAT of a model in memory (fp32 weights), in place: init, prepare, train, convert. The targeted layers are
    left as FakeQuantLinear; `checkpoint.hf.install_quantized` turns the returned QWeights into QuantLinear layers.

    `started` (a time.perf_counter() value, default now) starts the clock of a `budget.minutes` recipe: the
    budget covers initialisation and training. `evaluate_init(model)` runs on the fake-quant model before
    training (it equals the PTQ model exactly); its time is not charged to the budget."""
    started = time.perf_counter() if started is None else started
    cfg = recipe.training
    teacher = copy.deepcopy(model).eval() if cfg.loss == "kd" else None
    t = time.perf_counter()
    qweights, summary = blockwise.quantize_model(model, init_recipe(recipe), scale_dtype, calibration, log)
    init_seconds = time.perf_counter() - t
    logger.info(f"initialised from {recipe.method.init} in {init_seconds:.1f} s")
    prepare(model, qweights, summary.schemes, scale_dtype, recipe.method)
    deadline = None if cfg.budget.minutes is None else started + cfg.budget.minutes * 60
    eval_seconds = 0.0
    if evaluate_init is not None:
        t = time.perf_counter()
        evaluate_init(model)
        eval_seconds = time.perf_counter() - t
        deadline = None if deadline is None else deadline + eval_seconds
    layer_names = set(fake_quant_layers(model))
    stats = training.fine_tune(
        model, teacher, train_windows, cfg, key=key, state_path=state_path, deadline=deadline,
        keep_in_state=lambda k: k.rpartition(".")[0] in layer_names, stop_after=stop_after,
    )
    del teacher
    if len(stats.losses) < stats.steps:
        raise LlmqError(f"stopped after step {stop_after} of {stats.steps} (as asked)")
    return QatResult(convert(model), summary, stats, init_seconds, eval_seconds)


def quantize_checkpoint(
    recipe: Recipe,
    base_dir: Path,
    work: Path,
    scale_dtype: torch.dtype,
    train_windows: torch.Tensor,
    calibration: torch.Tensor | None = None,
    *,
    evaluate_init: Callable[[nn.Module], None] | None = None,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    main: bool = True,
    stop_after: int | None = None,
):
    """`llmq run` for QAT: load the base model, train it into the folder `work` (training checkpoints there, so a
    rerun resumes), and write the converted checkpoint there (main process only). Returns (QuantizeSummary,
    QatResult). `work` must be empty or hold a training state of this same recipe and base model."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / training.STATE
    for leftover in work.glob("*.tmp"):  # a save interrupted by an earlier kill: the previous state is still whole
        leftover.unlink()
    if any(p.name not in (training.STATE, training.STATE_KEY, BUDGET) for p in work.iterdir()):
        raise LlmqError(f"{work} is not empty and holds no llmq QAT state; remove it to start over")
    model = load_model(base_dir, dtype=torch.float32)
    done = quantize_model(
        model, recipe, scale_dtype, train_windows, calibration, key=run_key(recipe, base_dir, calibration, train_windows), state_path=state_path,
        started=t0, evaluate_init=evaluate_init, log=log, stop_after=stop_after,
    )
    init = done.init
    summary = QuantizeSummary(layers=list(done.qweights), rows=init.rows, has_g_idx=init.has_g_idx, schemes=init.schemes,
                              skipped=init.skipped)
    if main:
        install_quantized(model, recipe.scheme.to_scheme(), done.qweights, scale_dtype, recipe.targets, recipe.ignore,
                          has_g_idx=init.has_g_idx, schemes=init.schemes, skipped=init.skipped)
        model.save_pretrained(work)
        state_path.unlink(missing_ok=True)
        training.state_key_path(state_path).unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - t0 - done.init_eval_seconds
    return summary, done
