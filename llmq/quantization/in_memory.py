"""`llmq.quantize`: quantize a model already in memory, in place, with the same block walk and QAT run as
`llmq run` (README, Use)."""

from __future__ import annotations

import torch

from ..checkpoint.hf import install_quantized
from ..environment import output_dtype
from ..errors import BadInputError
from ..methods import needs_calibration
from ..model.structure import targeted_linears
from ..recipe import BNB_FORMATS, Recipe, check_against_layers
from . import blockwise, qat


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
    if recipe.scheme.budget is not None:
        raise BadInputError("scheme.budget: the in-memory API takes schemes as given; a budget is chosen by `llmq run` "
                            "(its recipe.yaml then names every layer's scheme), or call llmq.quantization.budget.choose "
                            "on the base checkpoint first")
    base = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype = output_dtype(recipe.output.dtype, base)
    layers = targeted_linears(model, recipe.targets, recipe.ignore)
    check_against_layers(recipe, {n: m.in_features for n, m in layers.items()})
    if needs_calibration(recipe.method) and calibration is None:
        raise BadInputError(f"method {recipe.method.name} needs calibration token windows ([n, seqlen] token ids)")
    if recipe.method.name == "qat" and not recipe.method.blockwise:
        if training is None:
            raise BadInputError("method qat needs training token windows ([n, seqlen] token ids)")
        done = qat.quantize_model(model.float(), recipe, dtype, training, calibration)
        qweights, summary = done.qweights, done.init
    else:
        qweights, summary = blockwise.quantize_model(model, recipe, dtype, calibration)
    install_quantized(model, scheme, qweights, dtype, recipe.targets, recipe.ignore, has_g_idx=summary.has_g_idx,
                      schemes=summary.schemes, skipped=summary.skipped, embedding=summary.embedding,
                      embedding_qweight=summary.embedding_qweight)
    return list(qweights)
