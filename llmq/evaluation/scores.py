"""How a score compares with the base model's: recovery for accuracies, the increase for perplexities."""

from __future__ import annotations

LOWER_IS_BETTER = frozenset({"ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def recovery(metric: str, base: float, quantized: float) -> float | None:
    """quantized / base for a score where higher is better (DESIGN.md, "Protocols"); None for perplexities, whose
    comparison is the increase."""
    if metric in LOWER_IS_BETTER or not base:
        return None
    return quantized / base
