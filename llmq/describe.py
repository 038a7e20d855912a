"""A quantization scheme in words, written once for every place that shows one to a person.

- `scheme_words(...)`, long: '4-bit, group 64, asymmetric' (messages, checkpoint labels, model cards),
  'bitsandbytes NF4, absmax per block of 64' for bitsandbytes' formats.
- `scheme_words(..., short=True)`: 'W4g64 asym', 'W8 per-channel sym' (leaderboard rows, layer reprs); a
  bitsandbytes format by its name ('nf4', 'int8').

It takes the scheme's fields rather than a `Scheme` because they come from many shapes of config (a recipe, an
llmq config.json, GPTQ's and compressed-tensors' configs, report.json) and may be odd values from a foreign file.
"""

from __future__ import annotations

BITSANDBYTES_WORDS = {
    "nf4": "bitsandbytes NF4, absmax per block of 64",
    "fp4": "bitsandbytes FP4, absmax per block of 64",
    "int8": "bitsandbytes LLM.int8, per row",
}


def per_channel(group_size) -> bool:
    """Whether a config's group size means one group per output channel (None in llmq, -1 in GPTQ's configs)."""
    return group_size in (None, -1)


def scheme_words(bits, group_size, symmetric, format: str = "int", short: bool = False) -> str:
    """The scheme in words (see the module docstring for the two forms)."""
    if format in BITSANDBYTES_WORDS:
        return format if short else BITSANDBYTES_WORDS[format]
    if short:
        group = " per-channel" if per_channel(group_size) else f"g{group_size}"
        return f"W{bits}{group} {'sym' if symmetric else 'asym'}"
    group = "per-channel" if per_channel(group_size) else f"group {group_size}"
    return f"{bits}-bit, {group}, {'symmetric' if symmetric else 'asymmetric'}"
