"""The regression gate: a recipe's `eval.thresholds` checked against the base and quantized results.

Why it exists: teams that ship quantized models from CI need a run to fail, with a message naming the task and
the numbers, when the quantized model falls below what they accept. `llmq run` writes its report first, then
exits 3 when the gate fails.

- `min_recovery: {task: ratio}`: the quantized score of the suite task (its primary metric) over the base score
  must be at least `ratio`.
- `max_ppl_increase: x`: the perplexity protocol's relative increase, quantized / base - 1, must be at most `x`.
"""

from __future__ import annotations

from typing import Any

from ..errors import LlmqError
from .scores import recovery


class GateFailed(LlmqError):
    """A recipe's thresholds were missed; the message lists every miss (CLI exit code 3)."""

    exit_code = 3


def check(thresholds, base: dict[str, dict[str, Any]], quantized: dict[str, dict[str, Any]],
          ppl_base: float | None, ppl_quantized: float | None) -> list[str]:
    """Every miss as one line; empty when the gate passes. `base` / `quantized` map task labels to store records."""
    misses = []
    for task, least in thresholds.min_recovery.items():
        if task not in base or task not in quantized:
            misses.append(f"{task}: no result for {'base' if task not in base else 'quantized'} (is it in the suite?)")
            continue
        metric = base[task]["metric"]
        b, q = base[task]["metrics"][metric], quantized[task]["metrics"][metric]
        ratio = recovery(metric, b, q)
        if ratio is None or ratio < least:
            shown = "n/a" if ratio is None else f"{ratio:.4f}"
            misses.append(f"{task}: recovery {shown} < {least} ({metric}: base {b:.4f}, quantized {q:.4f})")
    if thresholds.max_ppl_increase is not None:
        if ppl_base is None or ppl_quantized is None:
            misses.append("perplexity: base or quantized perplexity missing (eval.baseline must be true)")
        else:
            increase = ppl_quantized / ppl_base - 1
            if increase > thresholds.max_ppl_increase:
                misses.append(f"perplexity: increase {increase:+.2%} > {thresholds.max_ppl_increase:+.2%} "
                              f"(base {ppl_base:.4f}, quantized {ppl_quantized:.4f})")
    return misses
