"""The perplexity protocol's NLL, chunked over positions to bound memory, against a plain float64 reference."""

import pytest
import torch

from llmq.evaluation.perplexity import logits_nll


@pytest.mark.parametrize("batch,seqlen,chunk", [(1, 2, 256), (3, 700, 256), (2, 257, 256), (2, 33, 1), (1, 64, 5000)])
def test_chunked_nll_equals_a_float64_reference(batch, seqlen, chunk):
    g = torch.Generator().manual_seed(seqlen * 7 + chunk)
    vocab = 97
    logits = torch.randn(batch, seqlen, vocab, generator=g) * 3
    tokens = torch.randint(0, vocab, (batch, seqlen), generator=g)
    # reference: -log softmax of each next token, float64, one pass over the whole window
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    reference = -logp.gather(-1, tokens[:, 1:, None]).sum()
    got = logits_nll(logits, tokens, chunk=chunk)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)


def test_chunked_nll_reads_bf16_logits_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 50, generator=g).bfloat16()
    tokens = torch.randint(0, 50, (2, 300), generator=g)
    reference = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None]).sum()
    assert logits_nll(logits, tokens, chunk=128).item() == pytest.approx(reference.item(), rel=1e-6)
