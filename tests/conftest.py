"""Shared fixtures: a tiny random Llama with a real (tiny, byte-level BPE) tokenizer, saved as an HF folder."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few integer levels. "
    "A scale and a zero point per group of weights bring them back. Perplexity measures how surprised a model is. "
) * 40


def make_tokenizer(folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    return tok


def make_tiny_llama(folder: Path, seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(folder)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "eval.txt"
    path.write_text(TEXT * 3)
    return path


@pytest.fixture
def tiny_recipe(tiny_model_dir, tiny_corpus, tmp_path):
    """A recipe dict for the tiny model that runs in seconds; tests override what they need."""
    return {
        "name": "tiny",
        "model": str(tiny_model_dir),
        "method": "rtn",
        "scheme": {"bits": 4, "group_size": 32, "symmetric": False},
        "eval": {"data": str(tiny_corpus), "seqlen": 64, "max_windows": 4, "batch_size": 2},
        "output": {"dir": str(tmp_path / "out")},
    }


@contextmanager
def killed_at_block_1(monkeypatch):
    """Inside the block, the block walk's third shard write fails as a kill would: the rest shard and block 0 are
    on disk, block 1's write never lands. The writer is restored on leaving, so a rerun can resume."""
    from llmq.quantization import blockwise

    real, writes = blockwise._save_atomic, []

    def save_then_fail(tensors, path):
        writes.append(path.name)
        if len(writes) == 3:
            raise RuntimeError("killed")
        real(tensors, path)

    monkeypatch.setattr(blockwise, "_save_atomic", save_then_fail)
    try:
        yield
    finally:
        monkeypatch.setattr(blockwise, "_save_atomic", real)
