"""`quant_method: "llmq"` in config.json: the scheme, which layers, the format version (README, FORMAT).

`LlmqConfig.from_scheme` is the one place a checkpoint's config is made from a `Scheme`; hf.py registers the class
with transformers.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import LlmqError
from ..numerics import Scheme
from ..recipe.targets import pattern
from ..version import __version__

QUANT_METHOD = "llmq"
FORMAT_VERSION = 3  # 2: per-layer schemes (`layers`); 3: a quantized embedding (`embedding`). Each file is written
# with the lowest version that holds it, so a checkpoint without either is still version 1
LAYER_KEYS = ("qweight", "scales", "qzeros")


class EmbeddingPlan(NamedTuple):
    """The token embedding quantized: its module name, its scheme, and the output projection tied to it (or None)."""

    name: str
    scheme: Scheme
    tied_head: str | None = None


class LlmqConfig(QuantizationConfigMixin):
    """The `quantization_config` of an llmq checkpoint: scheme, which layers, and the format version. Passed to
    `from_pretrained` of a full-precision model (`LlmqConfig(bits=4, group_size=128)`), it quantizes while loading
    (checkpoint/hf.py)."""

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = 128,
        sym: bool = False,
        format: str = "int",
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        g_idx: bool = False,
        layers: dict[str, dict[str, Any]] | None = None,
        embedding: dict[str, Any] | None = None,
        format_version: int | None = None,
        llmq_version: str | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.sym, self.format = bits, group_size, sym, format
        self.targets = list(targets) if targets is not None else [r".*"]
        self.ignore = list(ignore) if ignore is not None else [r"lm_head"]
        self.g_idx = g_idx
        self.layers = {name: dict(v) for name, v in (layers or {}).items()}  # layer -> {bits, group_size, sym}
        # not given (a config made in code): the lowest version that holds it; read from a file: as written
        format_version = format_version if format_version is not None else 3 if embedding else 2 if layers else 1
        self.format_version = format_version
        if self.layers and format_version < 2:
            raise LlmqError(f"quantization_config: per-layer schemes (layers) need format_version 2, got {format_version}")
        # {name, bits, group_size, sym, tied_head}: the token embedding stored quantized (quant_embedding.py)
        self.embedding = dict(embedding) if embedding else None
        if self.embedding and format_version < 3:
            raise LlmqError(f"quantization_config: a quantized embedding needs format_version 3, got {format_version}")
        self.llmq_version = llmq_version
        if format_version > FORMAT_VERSION:
            raise LlmqError(
                f"this checkpoint uses llmq format version {format_version}; this llmq reads up to {FORMAT_VERSION} "
                "(upgrade llmq)"
            )

    @classmethod
    def from_scheme(cls, scheme: Scheme, targets: list[str], ignore: list[str], g_idx: bool,
                    schemes: dict[str, Scheme] | None = None, skipped: list[str] = (),
                    embedding: EmbeddingPlan | None = None) -> LlmqConfig:
        """The config of a checkpoint this llmq writes: every llmq checkpoint's config is made here. `schemes` (layer →
        scheme) records the layers whose scheme differs from `scheme`; `skipped` layers (kept in full precision by an
        override) join `ignore` by exact name, so readers of version 1 select the same layers; `embedding`: the
        quantized token embedding, if any."""
        layers = {n: {"bits": s.bits, "group_size": s.group_size, "sym": s.symmetric}
                  for n, s in sorted((schemes or {}).items()) if s != scheme}
        targets = [pattern(p) for p in targets]  # plain full-match regexes, as every llmq version reads them
        ignore = [pattern(p) for p in ignore] + [re.escape(n) for n in sorted(skipped)]
        emb = None if embedding is None else {
            "name": embedding.name, "bits": embedding.scheme.bits, "group_size": embedding.scheme.group_size,
            "sym": embedding.scheme.symmetric, "tied_head": embedding.tied_head}
        version = 3 if emb else 2 if layers else 1
        return cls(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.symmetric, format=scheme.format,
                   targets=targets, ignore=ignore, g_idx=g_idx, layers=layers, embedding=emb, format_version=version,
                   llmq_version=__version__)

    @property
    def scheme(self) -> Scheme:
        """The default scheme: every quantized layer's unless `layers` names it (`scheme_for`)."""
        return Scheme(bits=self.bits, group_size=self.group_size, symmetric=self.sym, format=self.format)

    def scheme_for(self, layer: str) -> Scheme:
        if layer not in self.layers:
            return self.scheme
        v = self.layers[layer]
        try:
            return Scheme(bits=int(v["bits"]), group_size=v["group_size"], symmetric=bool(v["sym"]), format=self.format)
        except (KeyError, TypeError, ValueError):
            raise LlmqError(f"quantization_config.layers.{layer}: expected bits, group_size and sym, got {v!r}") from None

    @property
    def embedding_plan(self) -> EmbeddingPlan | None:
        """The quantized token embedding this config records, or None."""
        e = self.embedding
        if not e:
            return None
        try:
            scheme = Scheme(bits=int(e["bits"]), group_size=e["group_size"], symmetric=bool(e["sym"]))
            return EmbeddingPlan(str(e["name"]), scheme, e.get("tied_head"))
        except (KeyError, TypeError, ValueError):
            raise LlmqError(f"quantization_config.embedding: expected name, bits, group_size, sym and tied_head, got {e!r}") from None

    @property
    def mixed(self) -> bool:
        return bool(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "format": self.format,
            "targets": self.targets,
            "ignore": self.ignore,
            "g_idx": self.g_idx,
            **({"layers": self.layers} if self.layers else {}),
            **({"embedding": self.embedding} if self.embedding else {}),
            "llmq_version": self.llmq_version,
        }
