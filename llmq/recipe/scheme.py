"""The recipe's `scheme:` section: bits, grouping, symmetry and format (or a preset), the per-layer `overrides:`
entries, the size budget that chooses each layer's scheme, and the token embedding's scheme; with `Strict`, the base
of every recipe section. schema.py assembles them into the Recipe.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..numerics import SUPPORTED_BITS, Scheme
from .presets import BNB_FORMATS, PRESETS
from .targets import pattern


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
