"""Everything `llmq run` checks before heavy work, also run alone by `llmq validate`: the recipe, its data specs,
its suite and thresholds, and its fit to the model's layers on a meta-device skeleton (no weights read)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import data, formats
from ..describe import scheme_words
from ..environment import folder_dtype, output_dtype
from ..errors import BadInputError
from ..evaluation import suite as suites
from ..formats import bitsandbytes as bnb_format
from ..methods import needs_calibration
from ..model.resolve import resolve
from ..model.structure import skeleton, targeted_linears
from ..numerics import kquant_type
from ..quantization import budget
from ..quantization.blockwise import embedding_plan
from ..recipe import BNB_FORMATS, Recipe, check_against_layers


def as_recipe(recipe: Recipe | str | Path | dict) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_yaml(recipe)


def check_model_shapes(recipe: Recipe, folder: Path) -> dict[str, int]:
    """Build the model on the meta device (no weights read) and check the recipe against its Linear layers."""
    found = formats.detect(folder)
    if found.kind != "full-precision":
        raise BadInputError(
            f"model {recipe.model!r} is {found.label}: llmq quantizes full-precision checkpoints"
            + (" (`llmq import` turns it into an llmq checkpoint to evaluate or serve)" if found.importable else "")
        )
    model = skeleton(folder)
    linears = targeted_linears(model, recipe.targets, recipe.ignore)
    layers = {n: m.in_features for n, m in linears.items()}
    schemes = check_against_layers(recipe, layers)
    embedding_plan(recipe, model)  # scheme.embedding's group size must divide the embedding width
    _check_gguf_grid(recipe, schemes, layers, output_dtype(recipe.output.dtype, folder_dtype(folder)))
    if recipe.scheme.budget is not None:  # a budget no candidate assignment can meet fails here
        budget.plan_budget(recipe, model, linears, schemes, output_dtype(recipe.output.dtype, folder_dtype(folder)))
    return {n: layers[n] for n in schemes}


def _check_gguf_grid(recipe: Recipe, schemes: dict, layers: dict[str, int], dtype: torch.dtype) -> None:
    """gguf_grid's scales must survive storage: K-quant scales (an fp16 value times a small integer) need float32,
    the others (fp16 values) float32 or float16."""
    if not recipe.method.gguf_grid or dtype == torch.float32:
        return
    k_layers = [n for n, s in schemes.items() if kquant_type(s, layers[n]) is not None]
    if k_layers:
        raise BadInputError(f"output.dtype: method.gguf_grid puts {len(k_layers)} layer(s) (e.g. {k_layers[0]}) on the "
                            f"K-quant grid, whose scales (an fp16 value times a small integer) {dtype} cannot hold; "
                            "set output.dtype: float32")
    if dtype != torch.float16:
        raise BadInputError(f"output.dtype: method.gguf_grid gives fp16 scales, which {dtype} cannot hold; set "
                            "output.dtype: float32 or float16")


def validate(recipe: Recipe | str | Path | dict, check_model: bool = True) -> Recipe:
    """Everything `run` checks before heavy work: the recipe, its evaluation data spec and (optionally) its fit to
    the model's layers (on a meta-device skeleton: no weights are read)."""
    recipe = as_recipe(recipe)
    if recipe.scheme.format in BNB_FORMATS:
        bnb_format.require()
    if recipe.eval is not None:
        data.load_text(recipe.eval.data)  # a wrong data spec fails here, not after quantizing
        eval_suite(recipe)  # a wrong suite, task name or threshold key too
    if needs_calibration(recipe.method) or recipe.scheme.budget is not None:
        c = recipe.calibration
        data.load_conversations(c.data) if c.chat_template else data.load_text(c.data)
    if recipe.training is not None:
        data.load_text(recipe.training.data)
    if check_model:
        check_model_shapes(recipe, resolve(recipe.model))
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


def scheme_label(recipe: Recipe) -> str:
    """The recipe's scheme in words, with its clipping for the integer grid: what `llmq run` and `validate` print."""
    s = recipe.scheme
    if s.format in BNB_FORMATS:
        return scheme_words(s.bits, s.group_size, s.symmetric, s.format)
    mixed = " with per-layer overrides" if recipe.overrides else ""
    if s.budget is not None:
        mixed = " with per-layer schemes chosen to the budget"
    if s.embedding is not None:
        e = s.embedding
        mixed += f", embedding {scheme_words(e.bits, e.group_size, e.symmetric, short=True)}"
    return f"{scheme_words(s.bits, s.group_size, s.symmetric, short=True)}{mixed}, clip={recipe.method.clip}"
