"""`quant_method: "llmq"` in config.json: the scheme, which layers, the format version (README, FORMAT).

`LlmqConfig.from_scheme` is the one place a checkpoint's config is made from a `Scheme`; hf.py registers the class
with transformers.
"""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import LlmqError
from ..numerics import Scheme
from ..version import __version__

QUANT_METHOD = "llmq"
FORMAT_VERSION = 1
LAYER_KEYS = ("qweight", "scales", "qzeros")


class LlmqConfig(QuantizationConfigMixin):
    """The `quantization_config` of an llmq checkpoint: scheme, which layers, and the format version."""

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = 128,
        sym: bool = False,
        format: str = "int",
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        g_idx: bool = False,
        format_version: int = FORMAT_VERSION,
        llmq_version: str | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.sym, self.format = bits, group_size, sym, format
        self.targets = list(targets) if targets is not None else [r".*"]
        self.ignore = list(ignore) if ignore is not None else [r"lm_head"]
        self.g_idx = g_idx
        self.format_version = format_version
        self.llmq_version = llmq_version
        if format_version > FORMAT_VERSION:
            raise LlmqError(
                f"this checkpoint uses llmq format version {format_version}; this llmq reads up to {FORMAT_VERSION} "
                "(upgrade llmq)"
            )

    @classmethod
    def from_scheme(cls, scheme: Scheme, targets: list[str], ignore: list[str], g_idx: bool) -> LlmqConfig:
        """The config of a checkpoint this llmq writes: every llmq checkpoint's config is made here."""
        return cls(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.symmetric, format=scheme.format,
                   targets=targets, ignore=ignore, g_idx=g_idx, llmq_version=__version__)

    @property
    def scheme(self) -> Scheme:
        return Scheme(bits=self.bits, group_size=self.group_size, symmetric=self.sym, format=self.format)

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
            "llmq_version": self.llmq_version,
        }
