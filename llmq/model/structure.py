"""The parts of a causal LM that quantization works on, found generically (no per-model table):

- `skeleton`: the model built on the meta device from its config alone (no weights read, no quantizer);
- `decoder_blocks`: the list of decoder blocks;
- `targeted_linears`: the Linear layers a recipe's target / ignore regexes select (a tied lm_head refused);
- `input_embedding`: the token embedding and the output projection tied to it (scheme.embedding quantizes both).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError
from ..recipe import is_targeted


def skeleton(folder: str | Path) -> nn.Module:
    """The model of `folder` built on the meta device from its config alone (no weights read, no quantizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks: among ModuleLists whose items share one class
    and hold Linear layers, the one with the most Linear layers in all (the layer stack beats an MoE expert list)."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(b) for b in mod}) != 1:
            continue
        count = sum(isinstance(m, nn.Linear) for m in mod.modules())
        if count > best_count:
            best, best_count = (name, mod), count
    if best is None:
        raise BadInputError(f"{type(model).__name__}: found no list of decoder blocks holding Linear layers")
    return best


def targeted_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """The nn.Linear layers of `model` that the target / ignore regexes select, by full module name."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_targeted(n, targets, ignore)}
    tied = _tied_output_embedding(model)
    if tied is not None and tied in found:
        raise BadInputError(
            f"targets select {tied}, whose weight is tied to the input embeddings; add it to ignore "
            "(quantizing a tied lm_head would also change the embeddings)"
        )
    return found


def _tied_output_embedding(model: nn.Module) -> str | None:
    """The output projection tied to the input embedding, by name: the same weight tensor, or, in a skeleton that
    from_pretrained has not tied yet, transformers' own tie mapping (`all_tied_weights_keys`)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None or get_in() is None:
        return None
    out_name = next(n for n, m in model.named_modules() if m is get_out())
    if getattr(get_out(), "weight", None) is getattr(get_in(), "weight", False):
        return out_name
    in_name = next(n for n, m in model.named_modules() if m is get_in())
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    return out_name if ties.get(f"{out_name}.weight") == f"{in_name}.weight" else None


def input_embedding(model: nn.Module) -> tuple[str, str | None]:
    """(full name of the token embedding, full name of the output projection tied to it, or None when untied)."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if get_in is not None else None
    # exactly nn.Embedding: subclasses (Gemma's scaled embedding multiplies by sqrt(hidden)) compute more than a lookup
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        found = type(emb).__name__ if emb is not None else "none"
        raise BadInputError(f"{type(model).__name__}: its token embedding ({found}) is not a plain nn.Embedding lookup, "
                            "which is all a quantized embedding reproduces; keep the embedding in full precision")
    return next(n for n, m in model.named_modules() if m is emb), _tied_output_embedding(model)
