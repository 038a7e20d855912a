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
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import BadInputError
from ..numerics import SUPPORTED_BITS, Scheme
from .messages import first_error, load_yaml
from .presets import BLOCKWISE_KEYS, BNB_FORMATS, GPTQ_KEYS, METHOD_NAMES, PRESETS, QAT_KEYS
from .targets import is_targeted, pattern


class Strict(BaseModel):
    """A section whose unknown keys are errors and whose values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SchemeConfig(Strict):
    """bits / group_size (null = per output channel) / symmetric; `preset` fills the defaults.

    `format`: int (llmq's integer grid, any bits) or a bitsandbytes format saved in bitsandbytes' own
    serialization — nf4 / fp4 (4-bit codebooks, absmax per block of 64 weights: group_size 64, symmetric) or
    int8 (LLM.int8: bitsandbytes quantizes, per output row). Those fix bits / group_size / symmetric: leave them
    out or give the values they need.
    """

    preset: str | None = None
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    format: Literal["int", "nf4", "fp4", "int8"] = "int"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, dict) and isinstance(data.get("preset"), str):
            name = data["preset"].upper()
            if name not in PRESETS:
                raise ValueError(f"unknown preset {data['preset']!r} (expected one of {', '.join(PRESETS)})")
            data = {**PRESETS[name], **data, "preset": name}
        if isinstance(data, dict) and isinstance(data.get("format"), str) and data["format"] in BNB_FORMATS:
            fixed = {k: v for k, v in BNB_FORMATS[data["format"]].items() if k != "methods"}
            for key, value in fixed.items():
                if key in data and data[key] != value:
                    raise ValueError(f"{key}: format {data['format']} needs {value if value is not None else 'null'}, "
                                     f"got {data[key]} (bitsandbytes fixes it; leave it out)")
            data = {**data, **fixed}
        return data

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _supported_bits(v)

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        return _positive_group(v, "per-channel")

    budget: SizeBudget | None = None
    embedding: EmbeddingScheme | None = None

    def to_scheme(self) -> Scheme:
        return Scheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, format=self.format)


def _supported_bits(v: int, key: str = "") -> int:
    """`v` as a bit width llmq writes; `key` ("bits: ") prefixes the message where pydantic does not name the key."""
    if v not in SUPPORTED_BITS:
        raise ValueError(f"{key}{v} is not supported (expected one of {', '.join(map(str, SUPPORTED_BITS))})")
    return v


def _positive_group(v: int | None, null_means: str, key: str = "") -> int | None:
    if v is not None and v <= 0:
        raise ValueError(f"{key}{v} must be a positive integer, or null for {null_means}")
    return v


def _valid_patterns(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            re.compile(pattern(p))
        except re.error as e:
            raise ValueError(f"{p!r} is not a valid regular expression ({e})") from None
    return patterns


def _scheme_dict(data: Any, where: str) -> Any:
    """A candidate or override written as a preset name, a short name (W3g64, W4g128-sym, W8) or a mapping."""
    if isinstance(data, str):
        short = re.fullmatch(r"[wW]([234568])(?:[gG](\d+))?(-sym|-asym)?", data.strip())
        if short:
            return {"bits": int(short[1]), "group_size": int(short[2]) if short[2] else None,
                    "symmetric": short[3] == "-sym"}
        if data.upper() in PRESETS:
            return {"preset": data}
        raise ValueError(f"{where} {data!r} is neither a short name (W3g64, W4g128-sym, W8 = per-channel) nor a preset "
                         f"({', '.join(PRESETS)})")
    return data


class LayerOverride(Strict):
    """One entry of `overrides:`: the layers its `targets` match (regexes, or llm-compressor's `re:` form) take this
    scheme — the keys given replace the recipe's scheme's — or, with `skip: true`, stay in full precision. The first
    override that matches a layer decides it."""

    targets: list[str]
    skip: bool = False
    preset: str | None = None
    bits: int | None = None
    group_size: int | None | Literal["inherit"] = "inherit"
    symmetric: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("preset"), str):
            name = data["preset"].upper()
            if name not in PRESETS or "format" in PRESETS[name]:
                raise ValueError(f"unknown preset {data['preset']!r} (expected one of the integer presets "
                                 f"{', '.join(k for k, v in PRESETS.items() if 'format' not in v)})")
            data = {**PRESETS[name], **data, "preset": name}
        return data

    @field_validator("targets")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one layer pattern")
        return _valid_patterns(v)

    @model_validator(mode="after")
    def _scheme_or_skip(self) -> LayerOverride:
        given = self.bits is not None or self.group_size != "inherit" or self.symmetric is not None
        if self.skip and given:
            raise ValueError("skip: true keeps the layers in full precision; give no bits / group_size / symmetric with it")
        if not self.skip and not given:
            raise ValueError("give the scheme keys that change (bits, group_size, symmetric, preset), or skip: true")
        if self.bits is not None:
            _supported_bits(self.bits, "bits: ")
        if isinstance(self.group_size, int):
            _positive_group(self.group_size, "per-channel", "group_size: ")
        return self

    def scheme_over(self, default: Scheme) -> Scheme:
        """This override's scheme: its keys over `default`'s."""
        return Scheme(bits=default.bits if self.bits is None else self.bits,
                      group_size=default.group_size if self.group_size == "inherit" else self.group_size,
                      symmetric=default.symmetric if self.symmetric is None else self.symmetric)


class SizeBudget(Strict):
    """`scheme.budget`: choose each targeted layer's scheme among `candidates` so that the measured sensitivity summed
    over the layers is least while the model fits the budget — exactly one of `bits_per_weight` (over the targeted
    Linear layers, with scales, zero points and g_idx as llmq stores them) or `size_mb` (the checkpoint's
    safetensors files, 10^6 bytes: every tensor and a bound on the headers). Candidates default to 2, 3, 4 and 8 bits with the scheme's group size and symmetry.
    With a size_mb budget, `embedding` lists candidates for the token embedding (and the head tied to it) as well,
    `none` keeping it in full precision.
    Sensitivity is measured on the first `sensitivity_samples` calibration windows (sensitivity.py). With
    `tie_shared_inputs` the layers of a block that read the same input (q/k/v, gate/up) are chosen together, as one:
    vLLM runs them as one fused matmul and needs them in one scheme."""

    bits_per_weight: float | None = Field(None, gt=0, le=32)
    size_mb: float | None = Field(None, gt=0)
    candidates: list[SchemeConfig] | None = None
    sensitivity_samples: int = Field(8, ge=1)
    tie_shared_inputs: bool = True  # layers reading one input (q/k/v, gate/up) get one scheme: vLLM fuses them
    embedding: list[EmbeddingScheme | None] | None = None  # the token embedding's candidates (none = full precision)

    @field_validator("candidates", mode="before")
    @classmethod
    def _short_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [_scheme_dict(c, "candidate") for c in v]
        return v

    @field_validator("embedding", mode="before")
    @classmethod
    def _full_precision(cls, v: Any) -> Any:
        if isinstance(v, list):  # `none` (or null): the table stays in the output dtype
            return [None if c is None or (isinstance(c, str) and c.strip().lower() == "none") else c for c in v]
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> SizeBudget:
        given = [k for k in ("bits_per_weight", "size_mb") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bits_per_weight or size_mb (got {', '.join(given) or 'none'})")
        if self.candidates is not None:
            if not self.candidates:
                raise ValueError("candidates: name at least one scheme")
            if any(c.format != "int" for c in self.candidates):
                raise ValueError("candidates: integer schemes only (bitsandbytes formats do not mix per layer)")
            if len({c.to_scheme() for c in self.candidates}) != len(self.candidates):
                raise ValueError("candidates: a scheme is listed twice")
        if self.embedding is not None:
            if self.size_mb is None:
                raise ValueError("embedding: bits_per_weight counts the Linear layers only; the embedding's scheme is "
                                 "chosen to a size_mb budget")
            if not self.embedding:
                raise ValueError("embedding: name at least one candidate (none = full precision)")
            if len({None if c is None else c.to_scheme() for c in self.embedding}) != len(self.embedding):
                raise ValueError("embedding: a candidate is listed twice")
        return self


class EmbeddingScheme(Strict):
    """`scheme.embedding`: quantize the token embedding too (RTN, the recipe's clipping), written as a short name
    (`W8` = 8-bit per row, `W4g64`) or a mapping. Groups run along the hidden dimension of each token's row. When the
    model ties its output projection (lm_head) to the embedding, the head reads the same quantized rows. On SmolLM2
    the tied 49k x 576 embedding is two thirds of a 4-bit checkpoint; llama.cpp quantizes it too."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = False

    @model_validator(mode="before")
    @classmethod
    def _short_name(cls, data: Any) -> Any:
        data = _scheme_dict(data, "scheme.embedding")
        if isinstance(data, dict) and "preset" in data:
            raise ValueError("scheme.embedding: give a short name (W8, W4g64) or bits / group_size / symmetric, not a "
                             "preset")
        return data

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _supported_bits(v)

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        return _positive_group(v, "one group per row")

    def to_scheme(self) -> Scheme:
        return Scheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


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

    min_recovery: dict[str, float] = {}  # suite task label -> least quantized / base score (e.g. arc_easy: 0.97)
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
    targets: list[str] = [r".*"]
    ignore: list[str] = [r"lm_head"]
    overrides: list[LayerOverride] = []
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
