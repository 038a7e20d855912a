"""The recipe's calibration text → fixed, seeded token windows (DESIGN.md protocol)."""

from __future__ import annotations

import torch

from .. import data, memory
from ..recipe import CalibrationConfig


def calibration_batches(cfg: CalibrationConfig, tokenizer) -> torch.Tensor:
    """[n_samples, seqlen] token windows of the calibration corpus, drawn with the recipe's seed."""
    ids = data.tokenize_corpus(tokenizer, data.load_text(cfg.data))
    windows = data.calibration_windows(ids, cfg.n_samples, cfg.seqlen, cfg.seed)
    del ids
    memory.trim()  # the tokenizer's working memory for a whole corpus is large and no longer needed
    return windows
