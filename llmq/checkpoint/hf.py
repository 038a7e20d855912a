"""Hugging Face integration: `quant_method: "llmq"` in config.json, understood by `from_pretrained`.

Importing llmq registers `LlmqConfig` and `LlmqHfQuantizer` with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds the QuantLinear layers and loads the packed tensors.
Before any weight is read, the quantizer checks that the checkpoint files hold exactly the tensors those
layers need: transformers fills missing tensors with random values, and a quantized checkpoint must never
load as random weights. `check_loaded` guards the other direction — a model loaded while llmq was not
registered (plain Linear layers with random weights under an llmq config) — wherever llmq's own code loads.
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

from .. import kernels
from ..errors import LlmqError
from ..model.structure import input_embedding, targeted_linears
from ..numerics import QWeight, Scheme
from .config import LAYER_KEYS, QUANT_METHOD, EmbeddingPlan, LlmqConfig
from .quant_embedding import replace_embedding
from .quant_linear import QuantLinear, replace_linears


class LlmqHfQuantizer(HfQuantizer):
    """Loads pre-quantized llmq checkpoints (llmq quantizes through `llmq run`, not at load time)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
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
        kernels.prepare(model)  # packed copies built now, so a torch.compile of the loaded model traces no set-up
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

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
    name, _ = input_embedding(model)
    head = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    # the skeleton is not tied yet when this runs (transformers ties after loading): the config says whether it will be
    tied = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
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
