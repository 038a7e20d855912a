"""Hugging Face integration: `quant_method: "llmq"` in config.json, understood by `from_pretrained`.

Importing llmq registers `LlmqConfig` and `LlmqHfQuantizer` with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the QuantLinear layers and loads the packed tensors.
Before any weight is read, the quantizer checks that the checkpoint files hold exactly the tensors those
layers need: transformers fills missing tensors with random values, and a quantized checkpoint must never
load as random weights. `check_loaded` guards the other direction — a model loaded while llmq was not
registered (plain Linear layers with random weights under an llmq config) — wherever llmq's own code loads.

Given `quantization_config=LlmqConfig(...)` for a full-precision checkpoint, the same quantizer quantizes while
loading (`QuantizeOnLoad`): each targeted weight becomes a QuantLinear the moment transformers reads it (RTN, min-max,
through numerics.py), so the full-precision model is never held whole.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError, safe_open
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .. import kernels, numerics
from ..errors import BadInputError, LlmqError
from ..model.structure import input_embedding, targeted_linears
from ..numerics import SUPPORTED_BITS, QWeight, Scheme
from .config import LAYER_KEYS, QUANT_METHOD, EmbeddingPlan, LlmqConfig
from .quant_embedding import replace_embedding
from .quant_linear import QuantLinear, replace_linears


class LlmqHfQuantizer(HfQuantizer):
    """Loads llmq checkpoints; and, given `quantization_config=LlmqConfig(...)` for a full-precision model, quantizes
    it while loading (RTN, min-max: what `llmq run` with method rtn writes), one weight at a time as transformers
    reads it, so the full-precision model is never held whole."""

    requires_calibration = False  # llmq's calibrated methods run through `llmq run`; RTN needs no data

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return self._prepare_quantize_on_load(model)
        cfg: LlmqConfig = self.quantization_config
        layers = targeted_linears(model, cfg.targets, cfg.ignore)
        names = sorted(layers)
        stray = sorted(set(cfg.layers) - set(names))
        if stray:
            raise LlmqError(f"quantization_config.layers names {stray[0]}, which its targets / ignore do not quantize: "
                            "a damaged or hand-edited config")
        embedding = cfg.embedding_plan
        if embedding is not None:
            _check_embedding(model, embedding)
        if checkpoint_files:
            check_checkpoint_keys([str(f) for f in checkpoint_files], names, cfg.g_idx,
                                  embedding.name if embedding else None)
        # scales and bias follow the dtype the model is being built in (from_pretrained's `dtype`)
        scale_dtype = next(iter(layers.values())).weight.dtype if layers else torch.float32
        replace_linears(model, {n: cfg.scheme_for(n) for n in names}, names, scale_dtype, has_g_idx=cfg.g_idx)
        if embedding is not None:
            replace_embedding(model, embedding.name, embedding.scheme, scale_dtype, embedding.tied_head)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            self._finish_quantize_on_load(model)
        kernels.prepare(model)  # packed copies built now, so a torch.compile of the loaded model traces no set-up
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        layer, _, leaf = param_name.rpartition(".")
        return not self.pre_quantized and leaf == "weight" and layer in getattr(self, "_on_load", ())

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def _prepare_quantize_on_load(self, model):
        cfg: LlmqConfig = self.quantization_config
        if cfg.layers or cfg.embedding or cfg.g_idx or cfg.format != "int":
            raise BadInputError("quantize on load takes one integer scheme (bits, group_size, sym, targets, ignore); "
                                "per-layer schemes, embeddings and act order are written by `llmq run`")
        layers = targeted_linears(model, cfg.targets, cfg.ignore)
        if not layers:
            raise BadInputError(f"LlmqConfig targets {cfg.targets} / ignore {cfg.ignore} select no Linear layer")
        scheme = cfg.scheme
        if scheme.bits not in SUPPORTED_BITS:
            raise BadInputError(f"LlmqConfig bits {scheme.bits}: expected one of {SUPPORTED_BITS}")
        for name, layer in layers.items():
            if not scheme.fits(layer.in_features):
                raise BadInputError(f"LlmqConfig group_size {scheme.group_size} does not divide in_features "
                                    f"{layer.in_features} of {name}")
        self._on_load = set(layers)  # the layers QuantizeOnLoad replaces as their weights arrive
        return model

    def _finish_quantize_on_load(self, model) -> None:
        left = [n for n, m in model.named_modules() if n in self._on_load and not isinstance(m, QuantLinear)]
        if left:
            raise LlmqError(f"quantize on load: {left[0]} was not in the checkpoint's weights; nothing was quantized for it")
        cfg: LlmqConfig = self.quantization_config
        model.config.quantization_config = LlmqConfig.from_scheme(cfg.scheme, cfg.targets, cfg.ignore, False)
        self.quantization_config = model.config.quantization_config

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """QuantLinear traces without graph breaks (custom op + aten ops; tests/kernels/test_compiled_and_dense.py),
        so generate() may compile an llmq model's forward with a static cache, as it does a full-precision one."""
        return True


def install_quantized(
    model: torch.nn.Module,
    scheme: Scheme,
    qweights: dict,
    dtype: torch.dtype,
    targets: list[str],
    ignore: list[str],
    has_g_idx: bool = False,
    schemes: dict[str, Scheme] | None = None,
    skipped: list[str] = (),
    embedding: EmbeddingPlan | None = None,
    embedding_qweight: QWeight | None = None,
) -> None:
    """Make an in-memory model what `from_pretrained` builds from an llmq checkpoint: floating parameters cast to
    `dtype` (computed buffers such as rotary inv_freq stay fp32, as from_pretrained(dtype=...) leaves them), the
    layers named in `qweights` swapped for QuantLinear holding them, and the llmq quantization_config attached,
    so `save_pretrained` writes a checkpoint. Every method's in-memory result goes through here. `schemes`: each
    layer's scheme where they differ (default: `scheme` for all); `skipped`: layers an override kept in full precision;
    `embedding` with `embedding_qweight`: the token embedding quantized."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.config.dtype = dtype
    replace_linears(model, schemes or scheme, list(qweights), dtype, qweights, has_g_idx=has_g_idx)
    if embedding is not None:
        replace_embedding(model, embedding.name, embedding.scheme, dtype, embedding.tied_head, embedding_qweight)
    model.config.quantization_config = LlmqConfig.from_scheme(scheme, targets, ignore, has_g_idx, schemes, skipped,
                                                              embedding)


def _check_embedding(model: torch.nn.Module, embedding: EmbeddingPlan) -> None:
    """The config's embedding must be this model's token embedding, and its tied head the one the model ties."""
    name, tied = input_embedding(model)
    if embedding.name != name or embedding.tied_head != tied:
        raise LlmqError(f"quantization_config.embedding names {embedding.name} (tied head {embedding.tied_head}), but "
                        f"this model's token embedding is {name} (tied head {tied}): a damaged or foreign config")


def check_checkpoint_keys(files: list[str], layer_names: list[str], has_g_idx: bool,
                          embedding: str | None = None) -> None:
    """Refuse checkpoint files that are unreadable or do not hold exactly the packed tensors of these layers (and of
    the quantized embedding, when there is one)."""
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
    for name in [*layer_names, *([embedding] if embedding else [])]:
        missing = [k for k in (LAYER_KEYS if name == embedding else wanted) if f"{name}.{k}" not in keys]
        if missing:
            raise LlmqError(f"checkpoint lacks {name}.{missing[0]}: not a complete llmq checkpoint (would load random weights)")
        if f"{name}.weight" in keys:
            raise LlmqError(f"checkpoint holds both {name}.weight and {name}.qweight: not an llmq checkpoint of this layout")
    quantized_in_file = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")}
    unexpected = sorted(quantized_in_file - set(layer_names) - {embedding})
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


class QuantizeOnLoad:
    """transformers' conversion op for quantize on load: one Linear weight as read from the checkpoint → the
    QuantLinear that replaces the layer (its bias, read separately, lands in the new layer), returned as the packed
    buffers transformers then assigns."""

    def __init__(self, quantizer: LlmqHfQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, missing_keys=None,
                **kwargs) -> dict:
        out = {}
        scheme = self.quantizer.quantization_config.scheme
        for param_name, value in input_dict.items():
            w = value[0] if isinstance(value, list) else value
            layer_name = param_name.rpartition(".")[0]
            parent_name, _, child = layer_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            dtype = old.weight.dtype
            w = w.detach().float()  # RTN with min-max qparams, scales as stored: method rtn's defaults, from numerics
            scales, zeros = numerics.minmax_qparams(w, scheme)
            qw = numerics.quantize(w, scheme, numerics.stored_scales(scales, dtype), zeros)
            layer = QuantLinear(old.in_features, old.out_features, old.bias is not None, scheme, dtype,
                                device=w.device)
            if old.bias is not None and not old.bias.is_meta:  # the bias was read before the weight
                layer.bias = old.bias
            setattr(parent, child, layer)
            if missing_keys is not None:
                missing_keys.discard(param_name)  # read: it is the packed buffers now
            out.update({f"{layer_name}.{k}": t for k, t in numerics.pack_qweight(qw, scheme, dtype).items()})
        return out
