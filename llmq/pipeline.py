"""`llmq run`: the whole job of one recipe, in the order of DESIGN.md ("The flow of llmq run").

validate → resolve model → check shapes on a meta copy → tokenize evaluation, calibration and training text →
evaluate the base → quantize into a hidden partial folder (resumable: PTQ block by block from disk, QAT from its
training checkpoints) → move it into place → reload from disk with `from_pretrained` → evaluate what was saved →
report.json, model card, terminal table. Every check that can fail on user input runs before the first heavy step.

Under `accelerate launch` (QAT on several processes) every process trains; only the main one evaluates and writes.
"""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from . import blockwise, calibration, data, models, report, suites
from .errors import BadInputError
from .evaluate import Perplexity, evaluate_suite, perplexity
from .formats import bitsandbytes as bnb_format
from .gate import GateFailed
from .gate import check as check_gate
from .hf import install_quantized
from .io import check_output_free, move_into_place, partial_dir
from .methods import needs_calibration, qat
from .modules import targeted_linears
from .recipe import BNB_FORMATS, Recipe, check_against_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RunResult:
    recipe: Recipe
    output_dir: Path
    base_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def as_recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def check_model_shapes(recipe: Recipe, folder: Path) -> dict[str, int]:
    """Build the model on the meta device (no weights read) and check the recipe against its Linear layers."""
    from . import formats

    found = formats.detect(folder)
    if found.kind != "full-precision":
        raise BadInputError(
            f"model {recipe.model!r} is {found.label}: llmq quantizes full-precision checkpoints"
            + (" (`llmq import` turns it into an llmq checkpoint to evaluate or serve)" if found.importable else "")
        )
    layers = {n: m.in_features for n, m in targeted_linears(models.skeleton(folder), recipe.targets, recipe.ignore).items()}
    check_against_layers(recipe, layers)
    return layers


def validate(recipe: Recipe | str | Path | dict, check_model: bool = True) -> Recipe:
    """Everything `run` checks before heavy work: the recipe, its evaluation data spec and (optionally) its fit to
    the model's layers (on a meta-device skeleton: no weights are read)."""
    recipe = as_recipe(recipe)
    if recipe.scheme.format in BNB_FORMATS:
        bnb_format.require()
    if recipe.eval is not None:
        data.load_text(recipe.eval.data)  # a wrong data spec fails here, not after quantizing
        eval_suite(recipe)  # a wrong suite, task name or threshold key too
    if needs_calibration(recipe.method):
        data.load_text(recipe.calibration.data)
    if recipe.training is not None:
        data.load_text(recipe.training.data)
    if check_model:
        check_model_shapes(recipe, models.resolve(recipe.model))
    return recipe


def eval_suite(recipe: Recipe) -> suites.Suite | None:
    """The recipe's eval suite (limit applied), checked against its thresholds; None when it names none."""
    ev = recipe.eval
    if ev is None or ev.suite is None:
        return None
    suite = suites.load(ev.suite).with_limit(ev.limit)
    for task in ev.thresholds.min_recovery if ev.thresholds else {}:
        if task not in {t.label for t in suite.tasks}:
            raise BadInputError(f"eval.thresholds.min_recovery.{task}: suite {suite.name!r} has no task {task!r} "
                                f"(its tasks: {', '.join(t.label for t in suite.tasks)})")
    return suite


def quantize(
    model: torch.nn.Module, recipe: Recipe, calibration: torch.Tensor | None = None, training: torch.Tensor | None = None
) -> list[str]:
    """Quantize a model in memory, in place (targeted Linear → QuantLinear), and attach its llmq
    quantization_config. `calibration` ([n, seqlen] token ids) is needed by methods that calibrate (gptq, qat with
    init gptq); `training` ([n, seqlen] token ids of training text) by qat."""
    scheme = recipe.scheme.to_scheme()
    if scheme.format in BNB_FORMATS:
        raise BadInputError(f"scheme.format {scheme.format}: bitsandbytes formats are written by `llmq run` (through "
                            "transformers' bitsandbytes integration); the in-memory API makes llmq integer layers only")
    dtype = DTYPES[recipe.output.dtype]
    layers = targeted_linears(model, recipe.targets, recipe.ignore)
    check_against_layers(recipe, {n: m.in_features for n, m in layers.items()})
    if needs_calibration(recipe.method) and calibration is None:
        raise BadInputError(f"method {recipe.method.name} needs calibration token windows ([n, seqlen] token ids)")
    if recipe.method.name == "qat":
        if training is None:
            raise BadInputError("method qat needs training token windows ([n, seqlen] token ids)")
        done = qat.quantize_model(model.float(), recipe, dtype, training, calibration)
        qweights, has_g_idx = done.qweights, done.has_g_idx
    else:
        qweights, summary = blockwise.quantize_model(model, recipe, dtype, calibration)
        has_g_idx = summary.has_g_idx
    install_quantized(model, scheme, qweights, dtype, recipe.targets, recipe.ignore, has_g_idx=has_g_idx)
    return list(layers)


def world_size() -> int:
    """How many processes a distributed launch (accelerate launch / torchrun) started; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """False only in the non-main processes of a distributed launch."""
    if world_size() <= 1:
        return True
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def run(
    recipe: Recipe | str | Path | dict,
    overwrite: bool = False,
    output_dir: str | Path | None = None,
    console=None,
    resume: bool = False,
) -> RunResult | None:
    """Run a recipe end to end; returns the result (also written as report.json in the output folder).

    An interrupted run of the same recipe resumes by itself; `resume=True` insists on it (an error when there is
    nothing to resume). Non-main processes of a distributed QAT run train and return None."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    recipe = as_recipe(recipe)
    out = Path(output_dir) if output_dir is not None else recipe.output_dir
    check_output_free(out, overwrite)
    work = partial_dir(out)
    if resume and not (work.is_dir() and any(work.iterdir())):
        raise BadInputError(f"--resume: there is no interrupted run of {str(out)!r} to resume ({work} is missing or empty)")
    main = is_main_process()
    if world_size() > 1 and recipe.method.name != "qat":
        raise BadInputError(f"method {recipe.method.name} runs in one process; only qat trains on several (accelerate launch)")
    say = (console or Console(quiet=not main)).print

    bnb = recipe.scheme.format in BNB_FORMATS
    if bnb:
        bnb_format.require()
        if recipe.method.name == "rtn" and work.is_dir() and any(work.iterdir()):  # nothing to resume: say so, keep it
            raise BadInputError(f"{work} holds an interrupted run for {str(out)!r}, and {scheme_label(recipe)} with rtn "
                                "does not resume; remove that folder (or pick another output) to start afresh")
    t = time.perf_counter()
    base_dir = models.resolve(recipe.model)
    targeted = check_model_shapes(recipe, base_dir)
    tokenizer = models.load_tokenizer(base_dir)
    windows = None
    if recipe.eval is not None:
        ids = data.tokenize_corpus(tokenizer, data.load_text(recipe.eval.data))
        windows = data.eval_windows(ids, recipe.eval.seqlen, recipe.eval.max_windows)
    calib = train = None
    if needs_calibration(recipe.method):
        c = recipe.calibration
        calib = calibration.calibration_batches(c, tokenizer)
        say(f"calibration: {c.n_samples} windows x {c.seqlen} tokens of {c.data!r} (seed {c.seed})")
    if recipe.training is not None:
        tc = recipe.training
        # consecutive non-overlapping windows of the training text (the same cut as the perplexity protocol's)
        train = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text(tc.data)), tc.seqlen, None)
        say(f"training text: {train.shape[0]} windows x {tc.seqlen} tokens of {tc.data!r}")
    timings["prepare_s"] = time.perf_counter() - t

    metrics: dict[str, Perplexity] = {}
    if windows is not None and recipe.eval.baseline and main:
        t = time.perf_counter()
        model = models.load_model(base_dir, dtype=torch.float32)
        timings["load_base_s"] = time.perf_counter() - t
        say(f"evaluating base model: {windows.shape[0]} windows x {windows.shape[1]} tokens of {recipe.eval.data!r}")
        metrics["base"] = perplexity(model, windows, recipe.eval.data, recipe.eval.batch_size, desc="base ppl")
        timings["eval_base_s"] = metrics["base"].seconds
        del model
        gc.collect()

    dtype = DTYPES[recipe.output.dtype]
    extra: dict[str, Any] = {}
    bnb_model = None  # rtn with a bitsandbytes format: the model bitsandbytes quantized while loading
    if recipe.method.name == "qat":
        say(f"quantization-aware training ({scheme_label(recipe)}), starting from {recipe.method.init}")

        def evaluate_init(model):
            if windows is not None and main:
                say("evaluating the initial (PTQ) model: the fake-quant model before training")
                metrics["init"] = perplexity(model, windows, recipe.eval.data, recipe.eval.batch_size, desc="init ppl")
                timings["eval_init_s"] = metrics["init"].seconds

        summary, trained = qat.quantize_checkpoint(
            recipe, base_dir, work, dtype, train, calib, evaluate_init=evaluate_init, log=layer_printer(say), say=say,
            main=main,
        )
        if not main:
            return None
        extra["qat"] = {"init": recipe.method.init, "init_seconds": round(trained.init_seconds, 3),
                        "training": trained.train.to_dict()}
    elif bnb and recipe.method.name == "rtn":
        say(f"quantizing with bitsandbytes' own {scheme_label(recipe)}")
        t = time.perf_counter()
        bnb_model = bnb_format.quantize_with_bitsandbytes(base_dir, recipe.scheme.to_scheme(), dtype, list(targeted))
        summary = blockwise.QuantizeSummary(layers=list(targeted), seconds=time.perf_counter() - t)
    else:
        say(f"quantizing with {recipe.method.name} ({scheme_label(recipe)}), one decoder block at a time")
        summary = blockwise.quantize_checkpoint(recipe, base_dir, work, dtype, calib, log=layer_printer(say), say=say)
    timings["quantize_s"] = summary.seconds
    names = summary.layers

    t = time.perf_counter()
    final = work
    if bnb:
        final = _save_bitsandbytes(recipe, base_dir, work, dtype, names, bnb_model, say)
        del bnb_model
        gc.collect()
    tokenizer.save_pretrained(final)
    (final / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    move_into_place(final, out, overwrite)
    if final != work:  # the llmq shards GPTQ wrote, kept until the bitsandbytes checkpoint was in place
        shutil.rmtree(work, ignore_errors=True)
    timings["save_s"] = time.perf_counter() - t

    t = time.perf_counter()
    qmodel = models.load_model(out, bitsandbytes=bnb)
    timings["reload_s"] = time.perf_counter() - t
    if windows is not None:
        say(f"evaluating quantized model reloaded from {out}")
        metrics["quantized"] = perplexity(qmodel, windows, recipe.eval.data, recipe.eval.batch_size, desc="quantized ppl")
        timings["eval_quantized_s"] = metrics["quantized"].seconds
    suite = eval_suite(recipe)
    tasks: dict[str, Any] = {}
    if suite is not None:
        from .results import ResultsStore

        t = time.perf_counter()
        store = ResultsStore(recipe.eval.store)
        if recipe.eval.baseline:
            say(f"suite {suite.name!r} on the base model")
            # data_parallel=False: under accelerate launch (QAT) the other processes have already returned
            base_run = evaluate_suite(str(base_dir), suite, store, name=recipe.model, say=say, data_parallel=False)
            tasks["base"] = base_run.by_label()
        say(f"suite {suite.name!r} on the quantized model")
        q_run = evaluate_suite(str(out), suite, store, base=recipe.model, model=qmodel, tokenizer=tokenizer, say=say,
                               data_parallel=False)
        tasks["quantized"] = q_run.by_label()
        tasks["suite"], tasks["store"] = suite.name, str(store.path)
        timings["eval_suite_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    all_metrics = {k: v.to_dict() for k, v in metrics.items()}
    if tasks:
        all_metrics["tasks"] = tasks
    result = RunResult(recipe, out, base_dir, timings, all_metrics)
    misses = None
    thresholds = recipe.eval.thresholds if recipe.eval is not None else None
    if thresholds is not None:
        ppl = [metrics[k].ppl if k in metrics else None for k in ("base", "quantized")]
        misses = check_gate(thresholds, tasks.get("base", {}), tasks.get("quantized", {}), *ppl)
    result.report = report.write(
        result, quantized_layers=names, layer_rows=summary.rows, quantization={"resumed_at_block": summary.resumed_at_block, **extra},
        command=f"llmq run recipe.yaml -o {shlex.quote(str(out))}",
        gate=None if misses is None else {"thresholds": thresholds.model_dump(), "passed": not misses, "misses": misses},
    )
    say(report.table(result))
    if misses:
        raise GateFailed("regression gate failed: " + "; ".join(misses) + f" (the model and its report are in {out})")
    return result


def _save_bitsandbytes(recipe: Recipe, base_dir: Path, work: Path, dtype: torch.dtype, names: list[str], bnb_model, say) -> Path:
    """Write the checkpoint in bitsandbytes' serialization into a fresh folder beside `work` and return it: the model
    bitsandbytes quantized (rtn), or, for gptq, bitsandbytes' modules carrying the codes GPTQ left in `work`."""
    from .checkpoint import CheckpointReader
    from .numerics import unpack_qweight

    scheme = recipe.scheme.to_scheme()
    if bnb_model is None:  # gptq: codes and absmax from the llmq shards in `work`
        say(f"writing GPTQ's {scheme.format} codes in bitsandbytes' format")
        bnb_model = bnb_format.quantize_with_bitsandbytes(base_dir, scheme, dtype, names)
        reader = CheckpointReader(work)
        qweights = {}
        for name in names:
            t = reader.read([f"{name}.qweight", f"{name}.scales", f"{name}.qzeros"])
            in_features = bnb_model.get_submodule(name).in_features
            qweights[name] = unpack_qweight(t[f"{name}.qweight"], t[f"{name}.scales"].float(), t[f"{name}.qzeros"], None,
                                            scheme, in_features)._replace(zeros=None)
        bnb_format.write_codes(bnb_model, qweights, scheme)
    final = work.with_name(work.name + "-bnb")
    shutil.rmtree(final, ignore_errors=True)
    bnb_model.save_pretrained(final)
    return final


def scheme_label(recipe: Recipe) -> str:
    s = recipe.scheme
    if s.format in BNB_FORMATS:
        return {"nf4": "NF4", "fp4": "FP4", "int8": "LLM.int8"}[s.format] + " (bitsandbytes" + (
            ", blocks of 64)" if s.format != "int8" else ", per row)")
    group = "per-channel" if s.group_size is None else f"g{s.group_size}"
    return f"W{s.bits}{group} {'sym' if s.symmetric else 'asym'}, clip={recipe.method.clip}"


def layer_printer(say):
    """One aligned line per quantized layer as the walk goes: the per-layer table of a run."""
    header = [False]

    def show(row: dict[str, Any]) -> None:
        if not header[0]:
            say(f"{'block':>5}  {'layer':<24} {'method':<8} {'loss / weight mse':>18} {'damp':>7} {'seconds':>8}")
            header[0] = True
        err = row.get("loss", row.get("weight_mse"))
        damp = f"{row['damp']:.3g}" if "damp" in row else "-"
        say(f"{row['block']:>5}  {row['layer']:<24} {row['method'][:8]:<8} {err:>18.5g} {damp:>7} {row['seconds']:>8.2f}")

    return show
