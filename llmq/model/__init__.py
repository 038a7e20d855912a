"""The model being quantized: where its files are (`resolve.py`) and which of its parts quantization works on
(`structure.py`). Loading weights is `llmq.loading`'s job, above the checkpoint formats."""

from .resolve import ALIASES, card_metadata, resolve
from .structure import decoder_blocks, skeleton, targeted_linears

__all__ = ["ALIASES", "card_metadata", "decoder_blocks", "resolve", "skeleton", "targeted_linears"]
