"""The two ways a recipe with a bitsandbytes format (nf4 / fp4 / int8) is quantized and saved:

- `rtn`: bitsandbytes' own round-to-nearest, done by transformers while it loads the base model;
- `gptq`: the block walk onto the NF4 / FP4 codebook writes llmq shards first; `save` then puts those codes into
  bitsandbytes' modules and writes bitsandbytes' serialization.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint.safetensors_io import CheckpointReader
from ..formats import bitsandbytes as bnb_format
from ..numerics import unpack_qweight
from ..recipe import Recipe
from .blockwise import QuantizeSummary

logger = logging.getLogger(__name__)


def quantize_rtn(recipe: Recipe, base_dir: Path, dtype: torch.dtype, targeted: list[str]):
    """(the model bitsandbytes quantized while loading, its summary)."""
    t = time.perf_counter()
    model = bnb_format.quantize_with_bitsandbytes(base_dir, recipe.scheme.to_scheme(), dtype, targeted)
    return model, QuantizeSummary(layers=list(targeted), seconds=time.perf_counter() - t)


def save(recipe: Recipe, base_dir: Path, work: Path, dtype: torch.dtype, names: list[str], bnb_model) -> Path:
    """Write the checkpoint in bitsandbytes' serialization into a fresh folder beside `work` and return it: the model
    bitsandbytes quantized (rtn), or, for gptq, bitsandbytes' modules carrying the codes GPTQ left in `work`."""
    scheme = recipe.scheme.to_scheme()
    if bnb_model is None:  # gptq: codes and absmax from the llmq shards in `work`
        logger.info(f"writing GPTQ's {scheme.format} codes in bitsandbytes' format")
        bnb_model = bnb_format.quantize_with_bitsandbytes(base_dir, scheme, dtype, names)
        reader = CheckpointReader(work)
        qweights = {}
        for name in names:
            t = reader.read([f"{name}.qweight", f"{name}.scales", f"{name}.qzeros"])
            in_features = bnb_model.get_submodule(name).in_features
            qweights[name] = unpack_qweight(t[f"{name}.qweight"], t[f"{name}.scales"].float(), t[f"{name}.qzeros"], None,
                                            scheme, in_features)._replace(zeros=None)
        bnb_format.write_codes(bnb_model, qweights, scheme)
    final = work.with_name(work.name + "-bnb")
    shutil.rmtree(final, ignore_errors=True)
    bnb_model.save_pretrained(final)
    return final
