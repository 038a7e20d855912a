"""lm-eval, run the way llmq needs it: on a model object already loaded, one task at a time, offline.

Why it exists: every evaluation in llmq (``llmq eval``, a recipe's ``eval.suite``) goes through these few calls, so
that a number in a report, the results store and the leaderboard always comes from the same lm-eval call with
the same seeds. The model is wrapped with ``HFLM(pretrained=model)`` (so llmq, GPTQ, compressed-tensors and
bitsandbytes checkpoints are scored as ``from_pretrained`` built them); tasks come from ``llmq/evaluation/tasks`` (plus any
include path a suite names) through a TaskManager built without lm-eval's default index (no hub, no 20 s scan).

Data parallel: under ``accelerate launch`` each process holds the model, and lm-eval's own data-parallel path
splits the documents by rank and gathers the scores (``HFLM`` leaves it off for a model object, so we switch it
on: rank, world size and the accelerator). Only rank 0 gets the results back.

Deliberately not here: which tasks (suite.py), the results store (store.py), perplexity (perplexity.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..environment import gpu_available, world_size
from ..errors import BadInputError
from ..kernels.dense import exact_dense
from .tasks import TASKS_DIR

# Bootstrap resamples for the standard error of metrics without a closed form (perplexity); lm-eval's default
# 100,000 takes minutes on LAMBADA's 5k documents. Accuracies use the closed form and are unaffected.
BOOTSTRAP_ITERS = 1000
SEED = 1234  # lm-eval's default fewshot / numpy / torch seed, fixed here so that a result is a pure function of its key
CPU_LOGITS_BUDGET = 3 * 2**30  # bytes for the fp32 logits lm-eval holds per batch on CPU (two copies)
# Larger batches are slower on CPU (measured, SmolLM2-135M on 2 cores: ARC-Easy 100 docs 0-shot 20.9 s at batch 8,
# 20.7 s at 16, 27.5 s at up to 64; MMLU 57 docs 12.3 / 15.8 / 44.7 s).
CPU_MAX_BATCH = 8


@dataclass(frozen=True)
class TaskScore:
    """One task's scores: ``metrics`` maps each metric (acc, acc_norm, perplexity, word_perplexity, ...) to its value
    and ``<metric>_stderr`` to its standard error where lm-eval gives one."""

    task: str
    shots: int
    limit: int | float | None
    metrics: dict[str, float]
    samples: int  # documents scored (all subtasks of a group)
    seconds: float
    logged: dict[str, list] | None = None  # with log_samples: lm-eval's per-document records, by (sub)task

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=8)
def task_manager(include: tuple[str, ...] = ()):
    """A TaskManager over llmq's offline tasks and the extra folders in `include` (no lm-eval default tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *include], include_defaults=False)


def task_names(include: tuple[str, ...] = ()) -> list[str]:
    """Every task and group name lm-eval knows here (the offline task folder, plus `include`); not tags."""
    manager = task_manager(include)
    return sorted(set(manager.all_subtasks) | set(manager.all_groups))


def check_tasks(tasks: list[str], include: tuple[str, ...] = ()) -> None:
    """Fail before any model is loaded when a task name is unknown, listing the ones that exist."""
    known = set(task_names(include))  # not tags: one result per name
    unknown = [t for t in tasks if t not in known]
    if unknown:
        shown = sorted(t for t in known if not t.startswith("llmq_mmlu_"))
        raise BadInputError(f"unknown task {unknown[0]!r}; known: {', '.join(shown)} (and llmq_mmlu_<subject>)")


AUTO_BATCH = "auto:4"  # lm-eval re-chooses the batch size 4 times per task, as the length-sorted requests shorten


def cpu_batch_size(length: int, vocab: int) -> int:
    """The most sequences of `length` tokens whose fp32 logits (two copies) fit CPU_LOGITS_BUDGET, within [1, CPU_MAX_BATCH]."""
    return max(1, min(CPU_MAX_BATCH, CPU_LOGITS_BUDGET // (2 * length * vocab * 4)))


@functools.lru_cache(maxsize=1)
def _hflm_class():
    """HFLM whose automatic batch size works on CPU too: lm-eval's search backs off on out-of-memory errors, which
    a GPU raises but a CPU answers by killing the process; there the batch comes from the logits' size instead."""
    from lm_eval.models.huggingface import HFLM

    class LlmqLM(HFLM):
        def _detect_batch_size(self, requests=None, pos: int = 0):
            if self.device.type == "cuda":
                return super()._detect_batch_size(requests, pos)
            if requests:
                _, context, continuation = requests[pos]
                length = len((context + continuation)[-(self.max_length + 1):][:-1])
            else:
                length = self.max_length
            return cpu_batch_size(max(length, 1), int(self.model.config.get_text_config().vocab_size))

    return LlmqLM


def wrap(model: torch.nn.Module, tokenizer, batch_size: int | str | None = None, data_parallel: bool = True):
    """The HFLM lm-eval scores (batch size automatic unless given), on this process's GPU when there is one;
    data-parallel over the processes of an `accelerate launch` unless `data_parallel` is False."""
    import os

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about model objects are about us, and known
    if gpu_available() and next(model.parameters()).device.type == "cpu" and not _is_bitsandbytes(model):
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")  # HFLM keeps a model object where it is
    lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or AUTO_BATCH)
    if data_parallel and world_size() > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not gpu_available())
        lm.accelerator, lm._rank, lm._world_size = accelerator, accelerator.process_index, accelerator.num_processes
    return lm


def _is_bitsandbytes(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def run_task(lm, task: str, shots: int, limit: int | float | None, include: tuple[str, ...] = (),
             chat_template: bool = False, log_samples: bool = False) -> TaskScore | None:
    """Score one task (or group) with lm-eval; None on the non-main processes of a data-parallel run. `limit`: a
    number of documents, or a fraction of them (below 1); `chat_template`: prompts through the tokenizer's chat
    template (lm-eval's apply_chat_template); `log_samples`: keep lm-eval's per-document records."""
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    # lm-eval's debug prints (batch sizes, bootstrapping) are dropped, its bars stay; an fp32 model scores exactly
    with contextlib.redirect_stdout(io.StringIO()), exact_dense(lm.model):
        out = simple_evaluate(
            model=lm, tasks=[task], num_fewshot=shots, limit=limit, task_manager=task_manager(include),
            bootstrap_iters=BOOTSTRAP_ITERS, random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
            fewshot_random_seed=SEED, log_samples=log_samples, cache_requests=False, apply_chat_template=chat_template,
        )
    if out is None:
        return None
    logged = out.get("samples") if log_samples else None
    return TaskScore(task, shots, limit, _metrics(out["results"][task]), _samples(out, task), time.perf_counter() - t0,
                     logged)


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys as 'acc' / 'acc_stderr' (the 'none' filter only)."""
    metrics = {}
    for key, value in row.items():
        name, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and value == value:  # drop NaN ("N/A" stderr)
            metrics[name] = float(value)
    return metrics


def _samples(out: dict[str, Any], task: str) -> int:
    counts = out.get("n-samples", {})
    if task in counts:
        return int(counts[task]["effective"])
    members = out.get("group_subtasks", {}).get(task, [])
    return sum(_samples(out, m) for m in members)

