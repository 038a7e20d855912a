"""bitsandbytes checkpoints (NF4, FP4, LLM.int8) written in bitsandbytes' own serialization, so that plain
transformers + bitsandbytes loads them with `from_pretrained` and no llmq import.

Two ways in, both through transformers' `BitsAndBytesConfig` so the files are exactly what transformers writes:
- `quantize_with_bitsandbytes`: bitsandbytes' own round-to-nearest (absmax per block of 64 for 4-bit, per row for
  LLM.int8), done while transformers loads the base model; then `save_pretrained`.
- `write_codes`: 4-bit codes and per-block absmax chosen by llmq (GPTQ onto the NF4 / FP4 codebook, numerics.py)
  written into those same Linear4bit modules — the packed data (two codes per byte, the first in the high
  nibble) and the quant state's absmax — before `save_pretrained`. Any bitsandbytes user loads the result.

What it does not do: run bitsandbytes' kernels (transformers does), stream block by block (the model is held in
memory once, in 4 bits), or read bitsandbytes checkpoints into llmq layers (formats/detect.py refuses that).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..environment import default_device
from ..errors import BadInputError, LlmqError
from ..model.structure import skeleton
from ..numerics import QWeight, Scheme


def require() -> None:
    """Refuse early (before any heavy work) when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInputError("scheme.format nf4 / fp4 / int8 saves through bitsandbytes: pip install 'llmq[bnb]' (or bitsandbytes)")


def config(scheme: Scheme, compute_dtype: torch.dtype, skip: list[str]):
    """transformers' BitsAndBytesConfig for `scheme` (blocks of 64, no double quantization: the absmax stays fp32)."""
    from transformers import BitsAndBytesConfig

    if scheme.format == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if scheme.format not in ("nf4", "fp4"):
        raise ValueError(f"not a bitsandbytes format: {scheme.format}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme.format, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)


def skipped_linears(base_dir: Path, targeted: list[str]) -> list[str]:
    """Full names of the model's Linear layers that are not targeted (bitsandbytes leaves those in full precision)."""
    model = skeleton(base_dir)
    chosen = set(targeted)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in chosen]


def quantize_with_bitsandbytes(base_dir: Path, scheme: Scheme, dtype: torch.dtype, targeted: list[str]):
    """The base model as transformers loads it onto bitsandbytes' modules: bitsandbytes' own quantization."""
    from transformers import AutoModelForCausalLM

    require()
    cfg = config(scheme, dtype, skipped_linears(base_dir, targeted))
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=cfg, device_map=default_device().type, dtype=dtype)
    return model.eval()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (0..15) → bitsandbytes' storage: the row-major stream, two codes per byte, the first in the
    high nibble, shaped [out * in / 2, 1] uint8."""
    flat = q.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        raise LlmqError("bitsandbytes 4-bit storage needs an even number of weights")
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def write_codes(model, qweights: dict[str, QWeight], scheme: Scheme) -> None:
    """Put llmq's codebook codes and per-block absmax into the model's bitsandbytes Linear4bit layers, in place."""
    import bitsandbytes as bnb

    for name, qw in qweights.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, bnb.nn.Linear4bit):
            raise LlmqError(f"{name}: expected a bitsandbytes Linear4bit, found {type(layer).__name__}")
        state = layer.weight.quant_state
        out, inp = qw.q.shape
        if qw.g_idx is not None or state.blocksize != scheme.group_size or inp % state.blocksize:
            raise LlmqError(f"{name}: codes in blocks of {scheme.group_size} along rows of {inp} (no g_idx) are needed "
                            f"for bitsandbytes blocks of {state.blocksize}")
        if state.quant_type != scheme.format or tuple(state.shape) != (out, inp):
            raise LlmqError(f"{name}: bitsandbytes layer is {state.quant_type} {tuple(state.shape)}, codes are "
                            f"{scheme.format} {(out, inp)}")
        packed = pack_nibbles(qw.q)
        if packed.shape != layer.weight.data.shape:
            raise LlmqError(f"{name}: packed codes {tuple(packed.shape)} do not fit storage {tuple(layer.weight.data.shape)}")
        layer.weight.data = packed.to(layer.weight.device)
        state.absmax = qw.scales.reshape(-1).to(torch.float32).to(state.absmax.device).contiguous()
