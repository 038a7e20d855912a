"""Text → token windows, the two ways llmq cuts a corpus (DESIGN.md, "Protocols").

The evaluation text is joined once and tokenized once, then split into non-overlapping windows from the start
(`eval_windows`); calibration draws `n_samples` windows at seeded random offsets (`calibration_windows`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BadInputError


def tokenize_corpus(tokenizer: Any, text: str) -> torch.Tensor:
    """1-D int64 token ids of the whole text, from one tokenizer call, with no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """[n, seqlen]: consecutive non-overlapping windows from the start of `ids`, the incomplete tail dropped,
    the first `max_windows` of them (all when None)."""
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise BadInputError(f"eval windows: seqlen ({seqlen}) and max_windows ({max_windows}) must be at least 1")
    n = ids.numel() // seqlen
    if n == 0:
        raise BadInputError(f"eval windows: the corpus has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids.reshape(-1)[: n * seqlen].reshape(n, seqlen).clone()


def calibration_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[n_samples, seqlen]: windows at random start offsets in [0, len - seqlen), drawn from a CPU generator seeded
    with `seed`, so the same seed gives the same windows on every run and platform."""
    if n_samples < 1 or seqlen < 1:
        raise BadInputError(f"calibration windows: n_samples ({n_samples}) and seqlen ({seqlen}) must be at least 1")
    ids = ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise BadInputError(
            f"calibration windows: the corpus has {ids.numel()} tokens, need at least seqlen + 1 = {seqlen + 1}"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
