"""`llmq run`: the whole job of one recipe, in the order of DESIGN.md ("The flow of llmq run"), as named stages:

prepare (check the recipe, the output and the model's shapes; tokenize evaluation, calibration and training text)
→ evaluate the base → quantize into a hidden partial folder (the route by method and format: the resumable block
walk from disk, QAT from its training checkpoints, or bitsandbytes' own quantization) → save (move it into place)
→ evaluate what was saved, reloaded with `from_pretrained` → report (report.json, model card, the gate).
Every check that can fail on user input runs in `prepare`, before the first heavy step.

Under `accelerate launch` (QAT on several processes) every process trains; only the main one evaluates and writes.
"""

from __future__ import annotations

import gc
import json
import logging
import shlex
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from .. import data, memory
from ..calibration import calibration_batches
from ..describe import scheme_words
from ..environment import default_device, folder_dtype, is_main_process, output_dtype, world_size
from ..errors import BadInputError
from ..evaluation.gate import GateFailed
from ..evaluation.gate import check as check_gate
from ..evaluation.perplexity import Perplexity, perplexity
from ..evaluation.store import ResultsStore
from ..evaluation.suite_run import evaluate_suite
from ..io import check_output_free, move_into_place, output_lock, partial_dir, write_json_atomic
from ..loading import load_model, load_tokenizer
from ..logs import as_text, shown_on
from ..methods import needs_calibration
from ..model.resolve import resolve
from ..quantization import bitsandbytes as bnb_quantization
from ..quantization import blockwise, qat
from ..quantization import budget as budget_solver
from ..quantization.blockwise import QuantizeSummary
from ..quantization.resume import BUDGET, run_key
from ..recipe import BNB_FORMATS, Recipe
from ..reporting import report
from ..reporting.tables import budget_table, layer_printer, run_table
from .preflight import as_recipe, check_model_shapes, eval_suite, scheme_label, validate

logger = logging.getLogger("llmq.run")


@dataclass
class RunResult:
    recipe: Recipe
    output_dir: Path
    base_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """What `prepare` settles for the later stages; the stages add their numbers to `metrics` and `timings`."""

    recipe: Recipe
    out: Path  # the output folder
    work: Path  # the hidden partial folder the quantize stage writes into
    base_dir: Path
    targeted: list[str]
    tokenizer: Any
    eval_windows: torch.Tensor | None
    calibration: torch.Tensor | None
    training: torch.Tensor | None
    main: bool
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Perplexity] = field(default_factory=dict)
    budget: dict[str, Any] | None = None  # what choose_schemes settled (report.json's quantization.budget)

    @property
    def dtype(self) -> torch.dtype:
        return output_dtype(self.recipe.output.dtype, folder_dtype(self.base_dir))

    @property
    def bitsandbytes(self) -> bool:
        return self.recipe.scheme.format in BNB_FORMATS

    def evaluate(self, model, name: str) -> None:
        """The perplexity protocol on `model`, recorded as metrics[name] (and its seconds as eval_<name>_s)."""
        ev = self.recipe.eval
        self.metrics[name] = perplexity(model, self.eval_windows, ev.data, ev.batch_size, desc=f"{name} ppl")
        self.timings[f"eval_{name}_s"] = self.metrics[name].seconds


@dataclass
class Quantized:
    """What the quantize stage leaves: the summary of the layers, the model bitsandbytes quantized (rtn with a
    bitsandbytes format), and what the report adds under `quantization`."""

    summary: QuantizeSummary
    bnb_model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def run(
    recipe: Recipe | str | Path | dict,
    overwrite: bool = False,
    output_dir: str | Path | None = None,
    console: Console | None = None,
    resume: bool = False,
) -> RunResult | None:
    """Run a recipe end to end; returns the result (also written as report.json in the output folder).

    An interrupted run of the same recipe resumes by itself; `resume=True` insists on it (an error when there is
    nothing to resume). Non-main processes of a distributed QAT run train and return None. Messages go to the
    "llmq" logger, and also to `console` when one is given."""
    t_start = time.perf_counter()
    recipe = as_recipe(recipe)
    out = Path(output_dir) if output_dir is not None else recipe.output_dir
    with shown_on(console), (output_lock(out) if is_main_process() else nullcontext()):
        job = prepare(recipe, out, overwrite, resume)
        if job.eval_windows is not None and job.recipe.eval.baseline and job.main:
            evaluate_base(job)
        if job.recipe.scheme.budget is not None:
            choose_schemes(job)
        done = quantize(job)
        if not job.main:
            return None
        save(job, done, overwrite)
        tasks = evaluate_quantized(job)
        job.timings["total_s"] = time.perf_counter() - t_start
        return write_report(job, done, tasks)


def prepare(recipe: Recipe, out: Path, overwrite: bool, resume: bool) -> Job:
    """Every check `llmq validate` makes, and those on the output folder, before any weight is read; then the token
    windows."""
    check_output_free(out, overwrite)
    validate(recipe, check_model=False)  # data specs, suite, thresholds: the model's shapes come next
    work = partial_dir(out)
    if resume and not (work.is_dir() and any(work.iterdir())):
        raise BadInputError(f"--resume: there is no interrupted run of {str(out)!r} to resume ({work} is missing or empty)")
    if world_size() > 1 and recipe.scheme.budget is not None:
        raise BadInputError("scheme.budget is chosen in one process: run the recipe without accelerate launch, or "
                            "give the schemes as overrides (the recipe.yaml a budget run writes names every layer's)")
    if world_size() > 1 and (recipe.method.name != "qat" or recipe.method.blockwise):
        raise BadInputError(f"method {recipe.method.name} runs in one process; only qat trains on several (accelerate launch)")
    if recipe.scheme.format in BNB_FORMATS and recipe.method.name == "rtn" and work.is_dir() and any(work.iterdir()):
        raise BadInputError(f"{work} holds an interrupted run for {str(out)!r}, and {scheme_label(recipe)} with rtn "
                            "does not resume; remove that folder (or pick another output) to start afresh")
    t = time.perf_counter()
    base_dir = resolve(recipe.model)
    targeted = list(check_model_shapes(recipe, base_dir))
    tokenizer = load_tokenizer(base_dir)
    job = Job(recipe, out, work, base_dir, targeted, tokenizer, _eval_windows(recipe, tokenizer),
              _calibration_windows(recipe, tokenizer), _training_windows(recipe, tokenizer), is_main_process())
    job.timings["prepare_s"] = time.perf_counter() - t
    return job


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _eval_windows(recipe: Recipe, tokenizer) -> torch.Tensor | None:
    if recipe.eval is None:
        return None
    ids = data.tokenize_corpus(tokenizer, data.load_text(recipe.eval.data))
    return data.eval_windows(ids, recipe.eval.seqlen, recipe.eval.max_windows)


def _calibration_windows(recipe: Recipe, tokenizer) -> torch.Tensor | None:
    if not needs_calibration(recipe.method) and recipe.scheme.budget is None:  # a budget measures sensitivity on them
        return None
    c = recipe.calibration
    windows = calibration_batches(c, tokenizer)
    logger.info(f"calibration: {c.n_samples} windows x {c.seqlen} tokens of {c.data!r} (seed {c.seed})")
    return windows


def _training_windows(recipe: Recipe, tokenizer) -> torch.Tensor | None:
    """Consecutive non-overlapping windows of the training text (the same cut as the perplexity protocol's)."""
    tc = recipe.training
    if tc is None or recipe.method.blockwise:  # block-wise QAT trains on the calibration activations
        return None
    windows = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text(tc.data)), tc.seqlen, None)
    logger.info(f"training text: {windows.shape[0]} windows x {tc.seqlen} tokens of {tc.data!r}")
    return windows


def evaluate_base(job: Job) -> None:
    t = time.perf_counter()
    model = load_model(job.base_dir, dtype=torch.float32)
    job.timings["load_base_s"] = time.perf_counter() - t
    w = job.eval_windows
    logger.info(f"evaluating base model: {w.shape[0]} windows x {w.shape[1]} tokens of {job.recipe.eval.data!r}")
    job.evaluate(model, "base")
    del model
    gc.collect()


# ------------------------------------------------------------------------------------------------------ quantize


def choose_schemes(job: Job) -> None:
    """`scheme.budget`: measure each layer's sensitivity (or reuse it), solve for the schemes, and carry on with the
    resolved recipe (one override per layer; it is the recipe saved beside the checkpoint). The choice is kept in the
    partial folder, so a resumed run quantizes exactly what the interrupted one chose, whatever the cache holds."""
    budget = job.recipe.scheme.budget
    t = time.perf_counter()
    saved, key = job.work / BUDGET, run_key(job.recipe, job.base_dir, job.calibration)
    kept = _read_json(saved)
    if isinstance(kept, dict) and kept.get("run") == key and {"recipe", "record"} <= set(kept):
        logger.info(f"resuming with the schemes the interrupted run chose ({saved})")
        job.recipe, job.budget = Recipe.from_dict(kept["recipe"], source=str(saved)), kept["record"]
    else:
        if job.work.is_dir() and any(p.name != BUDGET for p in job.work.iterdir()):
            raise BadInputError(f"{job.work} holds an interrupted run of a different recipe, model or calibration data; "
                                "remove it to start over")
        logger.info(f"choosing each layer's scheme to the budget ({budget.model_dump(exclude_none=True, exclude={'candidates'})})")
        job.recipe, job.budget = budget_solver.choose(job.recipe, job.base_dir, job.calibration, job.dtype, default_device())
        job.work.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"run": key, "recipe": job.recipe.to_dict(), "record": job.budget}, saved)
    job.timings["budget_s"] = time.perf_counter() - t
    table = budget_table(job.budget)
    logger.info(as_text(table), extra={"renderable": table})


def quantize(job: Job) -> Quantized:
    """Quantize into `job.work` by the route the recipe's method and format take (QUANTIZE_ROUTES)."""
    with memory.PeakRss() as peak:
        done = QUANTIZE_ROUTES[_route(job.recipe)](job)
    job.timings["quantize_s"] = done.summary.seconds
    if peak.mb is not None:  # report.json's quantization.peak_rss_mb: this process's resident set while quantizing
        done.extra["peak_rss_mb"] = peak.mb
    return done


def _route(recipe: Recipe) -> str:
    if recipe.method.name == "qat" and not recipe.method.blockwise:
        return "qat"
    if recipe.scheme.format in BNB_FORMATS and recipe.method.name == "rtn":
        return "bitsandbytes-rtn"
    return "blockwise"


def _quantize_blockwise(job: Job) -> Quantized:
    logger.info(f"quantizing with {job.recipe.method.name} ({scheme_label(job.recipe)}), one decoder block at a time")
    summary = blockwise.quantize_checkpoint(job.recipe, job.base_dir, job.work, job.dtype, job.calibration,
                                            log=layer_printer())
    return Quantized(summary)


def _quantize_bitsandbytes_rtn(job: Job) -> Quantized:
    logger.info(f"quantizing with bitsandbytes' own {scheme_label(job.recipe)}")
    model, summary = bnb_quantization.quantize_rtn(job.recipe, job.base_dir, job.dtype, job.targeted)
    return Quantized(summary, bnb_model=model)


def _quantize_qat(job: Job) -> Quantized:
    recipe = job.recipe
    logger.info(f"quantization-aware training ({scheme_label(recipe)}), starting from {recipe.method.init}")

    def evaluate_init(model) -> None:
        if job.eval_windows is not None and job.main:
            logger.info("evaluating the initial (PTQ) model: the fake-quant model before training")
            job.evaluate(model, "init")

    summary, trained = qat.quantize_checkpoint(recipe, job.base_dir, job.work, job.dtype, job.training, job.calibration,
                                               evaluate_init=evaluate_init, log=layer_printer(), main=job.main)
    extra = {"qat": {"init": recipe.method.init, "init_seconds": round(trained.init_seconds, 3),
                     "training": trained.train.to_dict()}}
    return Quantized(summary, extra=extra)


QUANTIZE_ROUTES: dict[str, Callable[[Job], Quantized]] = {
    "blockwise": _quantize_blockwise,
    "bitsandbytes-rtn": _quantize_bitsandbytes_rtn,
    "qat": _quantize_qat,
}


# -------------------------------------------------------------------------------------------- save, evaluate, report


def save(job: Job, done: Quantized, overwrite: bool) -> None:
    """Tokenizer and recipe beside the weights, then one rename into place (bitsandbytes' serialization first)."""
    t = time.perf_counter()
    final = job.work
    if job.bitsandbytes:
        final = bnb_quantization.save(job.recipe, job.base_dir, job.work, job.dtype, done.summary.layers, done.bnb_model)
        done.bnb_model = None
        gc.collect()
    (job.work / BUDGET).unlink(missing_ok=True)  # a resume file: report.json records the budget
    job.tokenizer.save_pretrained(final)
    (final / "recipe.yaml").write_text(yaml.safe_dump(job.recipe.to_dict(), sort_keys=False))
    move_into_place(final, job.out, overwrite)
    if final != job.work:  # the llmq shards GPTQ wrote, kept until the bitsandbytes checkpoint was in place
        shutil.rmtree(job.work, ignore_errors=True)
    job.timings["save_s"] = time.perf_counter() - t


def evaluate_quantized(job: Job) -> dict[str, Any]:
    """Reload what was saved, evaluate it, and run the recipe's suite on base and quantized; returns the suite's
    results ({} without a suite)."""
    t = time.perf_counter()
    qmodel = load_model(job.out, bitsandbytes=job.bitsandbytes)
    job.timings["reload_s"] = time.perf_counter() - t
    if job.eval_windows is not None:
        logger.info(f"evaluating quantized model reloaded from {job.out}")
        job.evaluate(qmodel, "quantized")
    suite = eval_suite(job.recipe)
    if suite is None:
        return {}
    t = time.perf_counter()
    ev, tasks = job.recipe.eval, {}
    store = ResultsStore(ev.store)
    if ev.baseline:
        logger.info(f"suite {suite.name!r} on the base model")
        # data_parallel=False: under accelerate launch (QAT) the other processes have already returned
        tasks["base"] = evaluate_suite(str(job.base_dir), suite, store, name=job.recipe.model, data_parallel=False).by_label()
    logger.info(f"suite {suite.name!r} on the quantized model")
    tasks["quantized"] = evaluate_suite(str(job.out), suite, store, base=job.recipe.model, model=qmodel,
                                        tokenizer=job.tokenizer, data_parallel=False).by_label()
    tasks["suite"], tasks["store"] = suite.name, str(store.path)
    job.timings["eval_suite_s"] = time.perf_counter() - t
    return tasks


def _embedding_record(summary: QuantizeSummary) -> dict[str, Any]:
    e = summary.embedding
    return {"name": e.name, "tied_head": e.tied_head,
            "scheme": scheme_words(e.scheme.bits, e.scheme.group_size, e.scheme.symmetric, short=True)}


def write_report(job: Job, done: Quantized, tasks: dict[str, Any]) -> RunResult:
    """report.json and the model card; the terminal table; then the gate (exit 3 on a miss, the report kept)."""
    metrics: dict[str, Any] = {k: v.to_dict() for k, v in job.metrics.items()}
    if tasks:
        metrics["tasks"] = tasks
    result = RunResult(job.recipe, job.out, job.base_dir, job.timings, metrics)
    thresholds = job.recipe.eval.thresholds if job.recipe.eval is not None else None
    misses = None
    if thresholds is not None:
        ppl = [job.metrics[k].ppl if k in job.metrics else None for k in ("base", "quantized")]
        misses = check_gate(thresholds, tasks.get("base", {}), tasks.get("quantized", {}), *ppl)
    summary = done.summary
    result.report = report.write(
        result, quantized_layers=summary.layers, layer_rows=summary.rows,
        quantization={"resumed_at_block": summary.resumed_at_block, **done.extra,
                      **({"budget": job.budget} if job.budget is not None else {}),
                      **({"embedding": _embedding_record(summary)} if summary.embedding is not None else {})},
        command=f"llmq run recipe.yaml -o {shlex.quote(str(job.out))}",
        gate=None if misses is None else {"thresholds": thresholds.model_dump(), "passed": not misses, "misses": misses},
    )
    table = run_table(result)
    logger.info(as_text(table), extra={"renderable": table})
    if misses:
        raise GateFailed("regression gate failed: " + "; ".join(misses) + f" (the model and its report are in {job.out})")
    return result
