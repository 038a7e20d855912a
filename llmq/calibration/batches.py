"""The recipe's calibration text → fixed, seeded token windows (DESIGN.md protocol)."""

from __future__ import annotations

import torch

from .. import data, memory
from ..errors import BadInputError
from ..recipe import CalibrationConfig


def chat_text(spec: str, tokenizer) -> str:
    """The conversations of `spec` through the tokenizer's chat template, concatenated."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"calibration.chat_template: the model's tokenizer has no chat template; set it to false "
                            f"(calibrate on {spec!r} as plain text needs a \"text\" field) or use an instruct model")
    return "".join(tokenizer.apply_chat_template(m, tokenize=False) for m in data.load_conversations(spec))


def calibration_batches(cfg: CalibrationConfig, tokenizer) -> torch.Tensor:
    """[n_samples, seqlen] token windows of the calibration corpus, drawn with the recipe's seed. With
    `chat_template`, the corpus is the file's conversations, each rendered by the tokenizer's chat template (its
    role markers and special tokens included, as the model sees them in use), one after another."""
    text = chat_text(cfg.data, tokenizer) if cfg.chat_template else data.load_text(cfg.data)
    ids = data.tokenize_corpus(tokenizer, text)
    windows = data.calibration_windows(ids, cfg.n_samples, cfg.seqlen, cfg.seed)
    del ids
    memory.trim()  # the tokenizer's working memory for a whole corpus is large and no longer needed
    return windows
