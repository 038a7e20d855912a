"""Hugging Face integration: `quant_method: "llmq"` in config.json, understood by `from_pretrained`.

Importing llmq registers `LlmqConfig` and `LlmqHfQuantizer` with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the QuantLinear layers and loads the packed tensors.
Before any weight is read, the quantizer checks that the checkpoint files hold exactly the tensors those
layers need: transformers fills missing tensors with random values, and a quantized checkpoint must never
load as random weights. `check_loaded` guards the other direction — a model loaded while llmq was not
registered (plain Linear layers with random weights under an llmq config) — wherever llmq's own code loads.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import LlmqError
from .modules import QuantLinear, replace_linears, targeted_linears
from .numerics import Scheme

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


class LlmqHfQuantizer(HfQuantizer):
    """Loads pre-quantized llmq checkpoints (llmq quantizes through `llmq run`, not at load time)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg: LlmqConfig = self.quantization_config
        layers = targeted_linears(model, cfg.targets, cfg.ignore)
        names = sorted(layers)
        if checkpoint_files:
            check_checkpoint_keys([str(f) for f in checkpoint_files], names, cfg.g_idx)
        # scales and bias follow the dtype the model is being built in (from_pretrained's `dtype`)
        scale_dtype = next(iter(layers.values())).weight.dtype if layers else torch.float32
        replace_linears(model, cfg.scheme, names, scale_dtype, has_g_idx=cfg.g_idx)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def install_quantized(
    model: torch.nn.Module,
    scheme: Scheme,
    qweights: dict,
    dtype: torch.dtype,
    targets: list[str],
    ignore: list[str],
    has_g_idx: bool = False,
) -> None:
    """Make an in-memory model what `from_pretrained` builds from an llmq checkpoint: floating parameters cast to
    `dtype` (computed buffers such as rotary inv_freq stay fp32, as from_pretrained(dtype=...) leaves them), the
    layers named in `qweights` swapped for QuantLinear holding them, and the llmq quantization_config attached,
    so `save_pretrained` writes a checkpoint. Every method's in-memory result goes through here."""
    from . import __version__

    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.config.dtype = dtype
    replace_linears(model, scheme, list(qweights), dtype, qweights, has_g_idx=has_g_idx)
    model.config.quantization_config = LlmqConfig(
        bits=scheme.bits, group_size=scheme.group_size, sym=scheme.symmetric, format=scheme.format,
        targets=targets, ignore=ignore, g_idx=has_g_idx, llmq_version=__version__,
    )


def check_checkpoint_keys(files: list[str], layer_names: list[str], has_g_idx: bool) -> None:
    """Refuse checkpoint files that are unreadable or do not hold exactly the packed tensors of these layers."""
    keys: set[str] = set()
    for f in files:
        if not f.endswith(".safetensors"):
            raise LlmqError(f"{f}: llmq checkpoints are safetensors files only")
        try:
            with safe_open(f, framework="pt") as fh:
                keys.update(fh.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise LlmqError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    wanted = LAYER_KEYS + (("g_idx",) if has_g_idx else ())
    for name in layer_names:
        missing = [k for k in wanted if f"{name}.{k}" not in keys]
        if missing:
            raise LlmqError(f"checkpoint lacks {name}.{missing[0]}: not a complete llmq checkpoint (would load random weights)")
        if f"{name}.weight" in keys:
            raise LlmqError(f"checkpoint holds both {name}.weight and {name}.qweight: not an llmq checkpoint of this layout")
    quantized_in_file = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")}
    unexpected = sorted(quantized_in_file - set(layer_names))
    if unexpected:
        raise LlmqError(f"checkpoint has quantized layer {unexpected[0]} that its config does not target")


def check_loaded(model: torch.nn.Module) -> None:
    """Raise if a model claims to be llmq-quantized but has no QuantLinear layers (loaded without llmq)."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method == QUANT_METHOD and not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise LlmqError(
            "this model's config says quant_method 'llmq' but it holds no QuantLinear layers: it was loaded without "
            "llmq registered, so its Linear weights are random. `import llmq` before from_pretrained."
        )


def register() -> None:
    """Make transformers aware of quant_method 'llmq' (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LlmqConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LlmqConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LlmqHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LlmqHfQuantizer)
