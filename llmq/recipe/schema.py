"""Recipes: the one YAML file that says what llmq should do, validated before any heavy work starts.

A recipe names a model, a method (rtn, gptq, qat), a scheme (bits, grouping, symmetry), which Linear layers to
target or ignore, calibration data, QAT's training run, evaluation and output.
Validation is strict (unknown keys are errors, so typos never silently fall back to defaults) and every
problem is reported as one line naming the key path and what was expected. Checks that need the model's
shapes (does the group size divide every targeted layer?) live in `check_against_layers`, called once the
model's config is known and still before any weights are touched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import BadInputError
from .messages import first_error, load_yaml
from .presets import BLOCKWISE_KEYS, BNB_FORMATS, GPTQ_KEYS, METHOD_NAMES, QAT_KEYS
from .scheme import LayerOverride, SchemeConfig, Strict, _valid_patterns
from .targets import is_targeted


class MethodConfig(Strict):
    """How weights are chosen. `clip: mse` searches a per-group clipping factor instead of plain min-max,
    minimizing sum |w - ŵ|^clip_norm over shrink factors 1 … 1 - clip_max_shrink in clip_grid steps.

    GPTQ only: `damp` (fraction of mean diag H added to the diagonal; grown until Cholesky succeeds),
    `block_size` (columns per lazy batch update), `act_order` (columns by descending diag H),
    `static_groups` (group qparams from the original weights: no g_idx on disk), `true_sequential`
    (inside a block, each group of layers is calibrated on the outputs of the already-quantized earlier ones),
    `clip_weights: hessian` (the clipping search weighs each input column's error by its Hessian diagonal).

    RTN and GPTQ: `gguf_grid` puts the scales on llama.cpp's grids, so `llmq export --format gguf` holds exactly
    these weights: symmetric 4/3/2-bit layers whose groups divide 256 (in_features a multiple of 256) on the
    K-quant grid (Q4_K / Q3_K / Q2_K: per 256 inputs one fp16 scale d, each group's scale an integer multiple of
    it), every other layer with fp16 scales (Q4_0 / Q4_1 / Q8_0). GPTQ needs static_groups with it.

    QAT only: `init` (rtn or gptq: where the fake-quant weights, scales and zero points start; with gptq the GPTQ
    keys above apply to that initialisation), `train_weights` (the latent full-precision weights are trained),
    `learn_scales` / `learn_zero_points` (LSQ-style learnable quantization parameters). The training run itself
    is the recipe's `training:` section.

    QAT `mode: blockwise` only (methods/qat/block_ap.py): each block trains on the calibration activations toward
    the full-precision model's block output. `train_weights` trains per-weight rounding offsets (lr `block_lr`, in
    grid steps), `learn_scales` the scales (lr `block_qparam_lr`, in log space); zero points keep the init's
    integers. `block_epochs` passes over the calibration batches per block, or `block_minutes`: wall clock for the
    whole method (initialisation included), turned into a step count per block on the first block and re-planned
    after each block from the time its steps took; a resumed run keeps the plan for the block it resumes at.
    """

    name: Literal[METHOD_NAMES] = "rtn"
    clip: Literal["minmax", "mse"] = "minmax"
    clip_grid: int = Field(50, ge=1, le=1000)
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    clip_norm: float = Field(2.0, ge=1.0, le=8.0)
    damp: float = Field(0.01, ge=0.0, le=10.0)
    block_size: int = Field(128, ge=1, le=65536)
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    clip_weights: Literal["uniform", "hessian"] = "uniform"
    gguf_grid: bool = False
    init: Literal["rtn", "gptq"] = "rtn"
    train_weights: bool = True
    learn_scales: bool = True
    learn_zero_points: bool = True
    mode: Literal["whole-model", "blockwise"] = "whole-model"
    block_epochs: int = Field(2, ge=1, le=1000)
    block_minutes: float | None = Field(None, gt=0)
    block_lr: float = Field(0.0, ge=0.0, le=1.0)
    block_qparam_lr: float = Field(0.01, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _keys_fit_method(self) -> MethodConfig:
        def changed(keys):
            return [k for k in keys if getattr(self, k) != type(self).model_fields[k].default]

        stray = changed(GPTQ_KEYS)
        if stray and self.init_method != "gptq":
            raise ValueError(f"{stray[0]} applies to method gptq (or qat with init: gptq) only, not {self.name!r}")
        stray = changed(QAT_KEYS + BLOCKWISE_KEYS)
        if stray and self.name != "qat":
            raise ValueError(f"{stray[0]} applies to method qat only, not {self.name!r}")
        stray = changed(BLOCKWISE_KEYS)
        if stray and self.mode != "blockwise":
            raise ValueError(f"{stray[0]} applies to qat with mode: blockwise only")
        if self.blockwise and "learn_zero_points" in self.model_fields_set and self.learn_zero_points:
            raise ValueError("learn_zero_points: block-wise QAT keeps the init's integer zero points (it trains rounding "
                             "offsets and scales); remove the key")
        if self.blockwise and "block_epochs" in self.model_fields_set and self.block_minutes is not None:
            raise ValueError("give block_epochs or block_minutes, not both")
        if self.blockwise and not ((self.learn_scales and self.block_qparam_lr > 0) or (self.train_weights and self.block_lr > 0)):
            raise ValueError("block-wise QAT with nothing to train: set learn_scales with block_qparam_lr > 0, or "
                             "train_weights with block_lr > 0 (rounding offsets)")
        if self.gguf_grid and self.name == "qat":
            raise ValueError("gguf_grid applies to methods rtn and gptq (QAT trains the scales off the grid)")
        if self.gguf_grid and self.name == "gptq" and not self.static_groups:
            raise ValueError("gguf_grid with gptq needs static_groups: true (a super-block's scales are chosen "
                             "together, from the original weights, before GPTQ walks the columns)")
        if self.name == "qat" and not (self.train_weights or self.learn_scales or self.learn_zero_points):
            raise ValueError("qat with train_weights, learn_scales and learn_zero_points all false has nothing to train")
        return self

    @property
    def blockwise(self) -> bool:
        """QAT trained block by block in the block walk (Block-AP), not the whole model at once."""
        return self.name == "qat" and self.mode == "blockwise"

    @property
    def init_method(self) -> str:
        """The PTQ method whose result a QAT run starts from (the method itself for rtn and gptq)."""
        return self.init if self.name == "qat" else self.name


class CalibrationConfig(Strict):
    data: str = "lambada"
    n_samples: int = Field(64, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0
    batch_size: int = Field(4, ge=1)  # windows per forward pass through a block (peak RSS: ~40 MB per window on SmolLM2, measured)
    # conversations (.jsonl lines with a "messages" list) rendered through the tokenizer's chat template: instruct
    # models calibrate on text shaped as they are used
    chat_template: bool = False

    @model_validator(mode="after")
    def _conversations(self) -> CalibrationConfig:
        if self.chat_template and not self.data.lower().endswith((".jsonl", ".jsonl.gz")):
            raise ValueError(f"chat_template: true reads conversations from a .jsonl(.gz) file of \"messages\" lists, "
                             f"not {self.data!r}")
        return self


class BudgetConfig(Strict):
    """How long QAT trains: exactly one of optimizer `steps`, training `tokens` (rounded up to whole steps), or
    wall-clock `minutes` for the whole method, initialisation included (turned into a step count once, after
    timing a step twice, and kept on resume so an interrupted run ends where an uninterrupted one would)."""

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, data: Any) -> Any:
        return {"steps": data} if isinstance(data, int) and not isinstance(data, bool) else data

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetConfig:
        given = [k for k in ("steps", "tokens", "minutes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, tokens or minutes (got {', '.join(given) or 'none'})")
        return self


class TrainingConfig(Strict):
    """QAT's fine-tune: `batch_size` windows of `seqlen` tokens of `data` per optimizer step (across all
    processes), `micro_batch_size` per forward pass (gradient accumulation makes up the rest). AdamW with linear
    warm-up over `warmup` (fraction of the steps) then cosine decay to zero; `lr` for the weights, `qparam_lr`
    for scales and zero points. `loss: kd` distils the full-precision model's next-token distribution (KL at
    `kd_temperature`; the teacher runs without gradients), `loss: next_token` is plain cross-entropy.
    `checkpoint_every` steps the training state is saved in the partial output folder, so a killed run resumes
    (bit-identical to an uninterrupted one on the same machine). `autocast: auto` = bf16 on GPU, fp32 on CPU."""

    data: str = "lambada"
    seqlen: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    budget: BudgetConfig = BudgetConfig(steps=100)
    loss: Literal["kd", "next_token"] = "kd"
    kd_temperature: float = Field(1.0, gt=0.0, le=100.0)
    lr: float = Field(1e-5, ge=0.0, le=1.0)
    qparam_lr: float = Field(1e-4, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(25, ge=1)
    seed: int = 0
    autocast: Literal["auto", "bf16", "off"] = "auto"

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainingConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size}"
            )
        return self


class PerplexityConfig(Strict):
    """Perplexity protocol: non-overlapping windows of `seqlen` tokens of `data`, the first `max_windows`."""

    data: str = "wiki"
    seqlen: int = Field(2048, ge=8)
    max_windows: int | None = Field(16, ge=1)
    batch_size: int = Field(1, ge=1)


class Thresholds(Strict):
    """The regression gate: a miss makes `llmq run` exit non-zero (3) with the task and the numbers."""

    min_recovery: dict[str, float] = Field(default_factory=dict)  # suite task label -> least quantized / base score (e.g. arc_easy: 0.97)
    max_ppl_increase: float | None = Field(None, ge=0)  # most relative perplexity increase (0.10 = +10%)

    @field_validator("min_recovery")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        for task, ratio in v.items():
            if not 0 < ratio <= 2:
                raise ValueError(f"{task}: {ratio} is not a recovery ratio (quantized / base score, e.g. 0.97)")
        return v


class EvalConfig(PerplexityConfig):
    """The perplexity protocol (always), an lm-eval suite on base and quantized (optional), and the gate."""

    baseline: bool = True  # evaluate the full-precision model too
    suite: str | None = None  # an eval suite by name (quick, leaderboard) or path; None: perplexity only
    limit: int | None = Field(None, ge=1)  # replaces every suite task's limit
    store: str | None = None  # results store file (default: $LLMQ_RESULTS, else results.jsonl in $LLMQ_CACHE, default ~/.cache/llmq)
    thresholds: Thresholds | None = None

    @model_validator(mode="after")
    def _gate_has_numbers(self) -> EvalConfig:
        if self.thresholds is None:
            return self
        if self.thresholds.min_recovery and self.suite is None:
            raise ValueError("thresholds.min_recovery needs eval.suite (the tasks whose recovery it checks)")
        if not self.baseline:
            raise ValueError("thresholds compare with the base model: they need eval.baseline: true")
        return self


class OutputConfig(Strict):
    dir: str | None = None  # default: out/<recipe name>
    # the dtype of scales and unquantized tensors; auto = the base checkpoint's own (SmolLM2 built in: float32)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class Recipe(Strict):
    name: str | None = None
    model: str
    method: MethodConfig = MethodConfig()
    scheme: SchemeConfig = SchemeConfig()
    targets: list[str] = Field(default_factory=lambda: [r".*"])
    ignore: list[str] = Field(default_factory=lambda: [r"lm_head"])
    overrides: list[LayerOverride] = Field(default_factory=list)
    calibration: CalibrationConfig = CalibrationConfig()
    training: TrainingConfig | None = None  # QAT only; default TrainingConfig() when method is qat
    eval: EvalConfig | None = EvalConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        """A name names; it never places: out/<name> must stay inside out/ (output.dir and -o choose places)."""
        if v is not None and (not v.strip() or v.startswith(".") or any(c in v for c in "/\\\0")):
            raise ValueError("a recipe name is a plain name (no path separators, not starting with '.'); choose the "
                             "output folder with output.dir or -o")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model (built-in alias, local folder, .gguf file or hub id)")
        return v

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return _valid_patterns(v)

    @model_validator(mode="after")
    def _qat_trains(self) -> Recipe:
        if self.method.name == "qat" and self.training is None:
            object.__setattr__(self, "training", TrainingConfig())
        return self

    @model_validator(mode="after")
    def _format_fits_method(self) -> Recipe:
        fmt, m = self.scheme.format, self.method
        if fmt not in BNB_FORMATS:
            return self
        if m.name not in BNB_FORMATS[fmt]["methods"]:
            raise ValueError(f"method {m.name!r} cannot produce format {fmt} (it takes {' or '.join(BNB_FORMATS[fmt]['methods'])})")
        if m.name == "rtn" and m.clip != "minmax":
            raise ValueError(f"method rtn with format {fmt} is bitsandbytes' own quantization (absmax): clip must be minmax "
                             "(use method gptq for a clipped, error-compensated one)")
        if m.name == "gptq" and m.act_order and not m.static_groups:
            raise ValueError(f"format {fmt} stores blocks in column order: act_order needs static_groups: true")
        return self

    @model_validator(mode="after")
    def _mixing_fits(self) -> Recipe:
        if self.scheme.format != "int" and (self.overrides or self.scheme.budget is not None):
            raise ValueError(f"scheme.format {self.scheme.format}: overrides and budgets mix integer schemes only")
        budget = self.scheme.budget
        if budget is not None and budget.embedding is not None and self.scheme.embedding is not None:
            raise ValueError("scheme.embedding fixes the embedding's scheme and scheme.budget.embedding lets the budget "
                             "choose it: give one of them")
        if self.scheme.embedding is not None or (budget is not None and budget.embedding is not None):
            key = "scheme.embedding" if self.scheme.embedding is not None else "scheme.budget.embedding"
            if self.scheme.format != "int":
                raise ValueError(f"{key}: format {self.scheme.format} is written by bitsandbytes, which keeps the "
                                 f"embedding in full precision; leave {key} out")
            if self.method.name == "qat" and not self.method.blockwise:
                raise ValueError(f"{key}: whole-model QAT trains the embedding in full precision; use "
                                 "method.mode: blockwise, or method rtn / gptq")
        return self

    @model_validator(mode="after")
    def _distinct_data(self) -> Recipe:
        if self.eval is not None and self.eval.data == self.calibration.data:
            raise ValueError(
                f"calibration.data and eval.data are both {self.eval.data!r}: never calibrate on the evaluation text"
            )
        if self.training is not None and self.method.name != "qat":
            raise ValueError(f"training applies to method qat only, not {self.method.name!r}")
        if self.eval is not None and self.training is not None and self.eval.data == self.training.data:
            raise ValueError(
                f"training.data and eval.data are both {self.eval.data!r}: never train on the evaluation text"
            )
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise BadInputError(f"{source}: expected a mapping of keys (model, method, scheme, ...), got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BadInputError(f"{source}: {first_error(e, cls)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if path.is_dir():
            raise BadInputError(f"recipe {str(path)!r} is a folder, not a recipe file (expected a .yaml file)")
        if not path.is_file():
            raise BadInputError(f"recipe file {str(path)!r} does not exist")
        data = load_yaml(path, "recipe")
        if isinstance(data, dict) and data.get("name") is None:
            data = {**data, "name": path.stem}  # validated like a written name: a file called ..yaml names nothing
        return cls.from_dict(data, source=str(path))

    # ------------------------------------------------------------------ derived

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir or f"out/{self.name or 'llmq'}")

    def to_dict(self) -> dict[str, Any]:
        """The validated recipe as plain data; keys added since a recipe format settled (overrides, budgets, the
        embedding's scheme, chat-template calibration) are left out when unused, so a recipe without them hashes (and
        resumes, and is saved) as before. (The output.dtype default became `auto`, which does change the hash of a
        recipe that leaves the dtype out: an interrupted run of an older llmq is then refused, not resumed; so did the
        block-wise QAT learning rates' defaults, which every recipe's method section carries.)"""
        data = self.model_dump(mode="json")
        if not data["overrides"]:
            del data["overrides"]
        for key in ("budget", "embedding"):
            if data["scheme"][key] is None:
                del data["scheme"][key]
        if "budget" in data["scheme"] and data["scheme"]["budget"]["embedding"] is None:
            del data["scheme"]["budget"]["embedding"]
        if not data["calibration"]["chat_template"]:
            del data["calibration"]["chat_template"]
        method = data["method"]
        if method["block_minutes"] is None:
            del method["block_minutes"]
        elif self.method.blockwise:
            del method["block_epochs"]  # the budget decides; written both, the recipe would be refused on reading
        if self.method.blockwise:
            del method["learn_zero_points"]  # not used by this mode, and refused when given
        return data

    def hash(self) -> str:
        """Content hash of the validated recipe (key order and formatting do not matter)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def is_targeted(self, module_name: str) -> bool:
        return is_targeted(module_name, self.targets, self.ignore)
