"""The fine-tune loop QAT runs: AdamW, warm-up + cosine, gradient accumulation, distillation, checkpoints, resume.

Why accelerate and not torch.distributed directly: `accelerate launch` already turns one script into data-parallel
or FSDP training on many GPUs and machines (and into gloo processes on CPUs), handles bf16 autocast and gradient
synchronisation, and users know its config files; this loop only decides what a step is. What a step is:

- the step's `batch_size` windows are a pure function of the step number (a seeded permutation per epoch of the
  training windows), split evenly across processes and then into micro-batches, so one process with gradient
  accumulation and N processes with the same global batch see the same data;
- each micro-batch's loss is a *sum* over its predicted tokens divided by the tokens this process sees per step,
  and data-parallel training averages gradients over processes: either way the gradient is the mean over the
  global batch;
- the training state (trainable tensors, optimizer, scheduler, step, losses) is saved every `checkpoint_every`
  steps by the main process (atomically), and a rerun with the same run key continues from it: same data, same
  state, so the same result as an uninterrupted run (bit-identical on the same machine and process count).

Deliberately absent: anything about quantization (fake_quant.py prepares and converts the model) and
evaluation. Only parameters with requires_grad train; everything else stays as it was.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...environment import gpu_available
from ...errors import LlmqError
from ...io import torch_save_atomic, write_json_atomic
from ...recipe import TrainingConfig

logger = logging.getLogger(__name__)

STATE = "llmq-qat-state.pt"  # tensors, numbers, lists and dicts only: read with torch.load(weights_only=True)
STATE_KEY = "llmq-qat-state.json"  # the run key and step, checked before the tensor file is opened


def state_key_path(state_path: Path) -> Path:
    return state_path.with_name(STATE_KEY)


@dataclass
class TrainStats:
    steps: int  # optimizer steps in the whole run
    batch_tokens: int  # tokens per optimizer step (global batch x seqlen)
    processes: int
    resumed_at_step: int = 0
    seconds: float = 0.0  # wall time of the steps this invocation ran
    losses: list[float] = field(default_factory=list)  # mean per-token loss of every step, all processes

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_tokens

    def to_dict(self) -> dict:
        ran = self.steps - self.resumed_at_step
        return {
            **asdict(self), "tokens": self.tokens,
            "tokens_per_s": ran * self.batch_tokens / self.seconds if self.seconds > 0 else None,
        }


def step_windows(step: int, n_windows: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the training windows of optimizer step `step`: consecutive slices of a seeded permutation of all
    windows, a fresh permutation each epoch (a pure function of the step, so resumed runs see the same data)."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def micro_loss(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, cfg: TrainingConfig, norm: int) -> torch.Tensor:
    """The loss of one micro-batch [b, seqlen], summed over its predicted tokens and divided by `norm`.

    kd: KL(teacher || student) of the next-token distributions at temperature T (times T², the usual scale);
    next_token: cross-entropy against the text. Both predict positions 1..seqlen-1 from the tokens before."""
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
    if cfg.loss == "next_token":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum") / norm
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
    t = cfg.kd_temperature
    kl = F.kl_div(
        F.log_softmax(logits.reshape(-1, logits.shape[-1]) / t, dim=-1),
        F.log_softmax(target.reshape(-1, target.shape[-1]) / t, dim=-1),
        log_target=True, reduction="sum",
    )
    return kl * (t * t) / norm


def param_groups(model: nn.Module, cfg: TrainingConfig, qparam_names: tuple[str, ...] = ("scales", "zeros")) -> list[dict]:
    """AdamW groups: weights at `lr` (with weight decay), quantization parameters at `qparam_lr` (without)."""
    weights, qparams = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (qparams if name.rpartition(".")[2] in qparam_names else weights).append(p)
    groups = []
    if weights:
        groups.append({"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    if qparams:
        groups.append({"params": qparams, "lr": cfg.qparam_lr, "weight_decay": 0.0})
    if not groups:
        raise LlmqError("nothing to train: no parameter requires a gradient")
    return groups


def trainable_state(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The state_dict entries a checkpoint must hold to restore training (`keep` selects them by name)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if keep(k)}


@dataclass
class _Setup:
    """One fine-tune's moving parts: the accelerator, the prepared student and optimizer, the teacher and the data."""

    acc: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None
    windows: torch.Tensor
    cfg: TrainingConfig

    @property
    def per_rank(self) -> int:
        return self.cfg.batch_size // self.acc.num_processes

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        rank, n = self.acc.process_index, self.per_rank
        mine = step_windows(step, self.windows.shape[0], self.cfg.batch_size, self.cfg.seed)[rank * n : (rank + 1) * n]
        return [self.windows[idx].to(self.acc.device) for idx in torch.split(torch.tensor(mine), self.cfg.micro_batch_size)]

    def forward_backward(self, step: int) -> torch.Tensor:
        """Gradients of one step accumulated over its micro-batches (synchronised once, on the last); the loss."""
        norm = self.per_rank * (self.windows.shape[1] - 1)  # predicted tokens this process sees per step
        total = torch.zeros((), device=self.acc.device)
        batches = self.micro_batches(step)
        for j, ids in enumerate(batches):
            sync = j == len(batches) - 1
            ctx = self.acc.no_sync(self.model) if not sync else nullcontext()
            with ctx, self.acc.autocast():
                loss = micro_loss(self.model, self.teacher, ids, self.cfg, norm)
                self.acc.backward(loss)
            total += loss.detach()
        return total


def _setup(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, cfg: TrainingConfig) -> _Setup:
    from accelerate import Accelerator

    mixed = "bf16" if cfg.autocast == "bf16" or (cfg.autocast == "auto" and gpu_available()) else "no"
    acc = Accelerator(mixed_precision=mixed, cpu=not gpu_available())
    if cfg.batch_size % (cfg.micro_batch_size * acc.num_processes):
        raise LlmqError(
            f"training.batch_size {cfg.batch_size} must be a multiple of micro_batch_size {cfg.micro_batch_size} "
            f"x {acc.num_processes} processes"
        )
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        teacher.to(acc.device)
    optimizer = torch.optim.AdamW(param_groups(student, cfg), betas=(0.9, 0.95), eps=1e-10)
    model, optimizer = acc.prepare(student, optimizer)
    return _Setup(acc, model, optimizer, teacher, windows, cfg)


def _saved_state(state_path: Path | None, key: str) -> dict[str, Any] | None:
    """The training state an interrupted run of this same key left, or None; another run's state is refused. The key
    is read from JSON first, and the tensor file is opened only with weights_only=True: a planted file in the
    partial folder is refused, never unpickled into code."""
    if state_path is None or not state_path.is_file():
        return None
    key_path = state_key_path(state_path)
    try:
        saved = json.loads(key_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        saved = None
    if not isinstance(saved, dict) or saved.get("key") != key:
        raise LlmqError(f"{state_path} holds the training state of a different recipe or model (or no readable "
                        f"{key_path.name}); remove it to start over")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean "not ours"
        raise LlmqError(f"{state_path}: not a training state llmq wrote ({type(e).__name__}); remove it to start over") from None
    if not isinstance(state, dict) or state.get("key") != key:
        raise LlmqError(f"{state_path} holds the training state of a different recipe or model; remove it to start over")
    return state


def _restore(run: _Setup, state: dict[str, Any], scheduler, stats: TrainStats, keep_in_state, state_path: Path) -> int:
    """Load a saved state into the model, optimizer, scheduler and stats; returns the step to continue at."""
    unwrapped = run.acc.unwrap_model(run.model)
    absent = [k for k in unwrapped.state_dict() if keep_in_state(k) and k not in state["model"]]
    unexpected = unwrapped.load_state_dict(state["model"], strict=False).unexpected_keys
    if unexpected or absent:
        raise LlmqError(f"{state_path} does not fit this model ({(unexpected or absent)[0]}); remove it to start over")
    run.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stats.resumed_at_step = int(state["step"])
    stats.losses = list(state["losses"])
    logger.info(f"resuming QAT at step {stats.resumed_at_step} of {stats.steps} from {state_path}")
    return stats.resumed_at_step


def fine_tune(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    cfg: TrainingConfig,
    *,
    key: str,
    state_path: Path | None = None,
    keep_in_state: Callable[[str], bool] = lambda name: True,
    deadline: float | None = None,
    stop_after: int | None = None,
) -> TrainStats:
    """Train `student` in place on token windows [n, seqlen]; returns what ran.

    `key` identifies the run (recipe, base model, data): a saved state with another key is refused, never reused.
    `deadline` (a time.perf_counter() value) turns a `budget.minutes` recipe into a step count, after timing a
    step; that count is saved with the state, so a resumed run stops where an uninterrupted one would.
    `stop_after` ends this invocation after that many steps in all (tests of resume use it to simulate a kill).
    """
    from accelerate.utils import broadcast_object_list
    from transformers import get_cosine_schedule_with_warmup

    run = _setup(student, teacher, windows, cfg)
    acc, model, optimizer = run.acc, run.model, run.optimizer
    seqlen = windows.shape[1]
    state = _saved_state(state_path, key)
    if state is not None:
        total_steps = int(state["total_steps"])
    else:
        total_steps = _budget_steps(cfg, seqlen, deadline, lambda: run.forward_backward(0), model)
        total_steps = broadcast_object_list([total_steps])[0]
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup * total_steps), total_steps)
    stats = TrainStats(steps=total_steps, batch_tokens=cfg.batch_size * seqlen, processes=acc.num_processes)
    start = 0 if state is None else _restore(run, state, scheduler, stats, keep_in_state, state_path)

    def checkpoint(step: int) -> None:
        if state_path is not None and acc.is_main_process:
            write_json_atomic({"key": key}, state_key_path(state_path))  # first: a state file never lacks its key
            torch_save_atomic({
                "key": key, "step": step, "total_steps": total_steps, "losses": stats.losses,
                "model": trainable_state(acc.unwrap_model(model), keep_in_state),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            }, state_path)
        acc.wait_for_everyone()

    t0 = time.perf_counter()
    bar = tqdm(range(start, total_steps), desc="qat", unit="step", initial=start, total=total_steps, disable=not acc.is_local_main_process)
    for step in bar:
        loss = run.forward_backward(step)
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = acc.reduce(loss, reduction="mean").item()
        stats.losses.append(mean_loss)
        bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{(step + 1 - start) * stats.batch_tokens / (time.perf_counter() - t0):.0f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == total_steps:
            checkpoint(done)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    stats.seconds = time.perf_counter() - t0
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    student.eval()
    acc.free_memory()
    return stats


def _budget_steps(cfg: TrainingConfig, seqlen: int, deadline: float | None, one_step, model) -> int:
    """Optimizer steps the budget allows; `minutes` times the forward + backward of a step twice (gradients dropped,
    no update made) and fits whole steps of the faster time into what is left before `deadline`."""
    budget = cfg.budget
    if budget.steps is not None:
        return budget.steps
    if budget.tokens is not None:
        return max(1, math.ceil(budget.tokens / (cfg.batch_size * seqlen)))
    if deadline is None:
        raise LlmqError("training.budget.minutes needs a deadline")
    times = []
    for _ in range(2):  # the first pass pays one-off costs (allocations, kernel choice): it overestimated by ~30%
        t = time.perf_counter()
        one_step()
        for p in model.parameters():
            p.grad = None
        times.append(time.perf_counter() - t)
    per_step = min(times) * 1.05  # optimizer step and logging on top of forward + backward
    left = deadline - time.perf_counter()
    steps = max(1, int(left // per_step))
    logger.info(f"budget {budget.minutes:g} min: one step takes {per_step:.1f} s, {left:.0f} s left -> {steps} steps")
    return steps

