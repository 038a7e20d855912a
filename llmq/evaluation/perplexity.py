"""The perplexity protocol, written once (DESIGN.md, "Protocols").

Perplexity: the corpus is joined once and tokenized once, cut into non-overlapping windows of `seqlen` tokens (the
incomplete tail dropped, the first `max_windows` kept), and perplexity is exp(mean NLL) over every predicted
token: seqlen - 1 per window, since each window starts fresh. The result always carries seqlen, window count
and token count, because a perplexity without them cannot be compared with anything. (lm-eval's word perplexity
is the task `llmq_wikitext`: a different, larger number, never mixed with this one.)

A quantized model loaded in fp32 is evaluated exactly: its layers run the dense kernel (dequantized once, the
reference's numbers bit for bit) instead of the bf16-inside CPU kernel a user's fp32 model runs for speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..kernels.dense import exact_dense


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    corpus: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens the mean is over
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# Positions per cross-entropy chunk: log-softmax over a 49k vocabulary costs 200 kB per position in fp32, so a whole
# 2048-token window would add two more copies of its logits (0.8 GB on SmolLM2) on top of the logits themselves.
NLL_CHUNK = 256


def logits_nll(logits: torch.Tensor, tokens: torch.Tensor, chunk: int = NLL_CHUNK) -> torch.Tensor:
    """Summed next-token NLL (fp32) of logits [b, seqlen, vocab] for tokens [b, seqlen], `chunk` positions at a time,
    so the extra memory is a chunk's log-softmax, not the whole window's."""
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, tokens.shape[1] - 1, chunk):
        stop = min(start + chunk, tokens.shape[1] - 1)
        part = logits[:, start:stop].reshape(-1, logits.shape[-1]).float()
        total += F.cross_entropy(part, tokens[:, start + 1:stop + 1].reshape(-1), reduction="sum")
    return total


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> tuple[float, int]:
    """Sum of next-token NLL over all windows [n, seqlen] and the number of predicted tokens."""
    device = next(model.parameters(), next(model.buffers())).device
    total, count = 0.0, 0
    with exact_dense(model):
        for batch in tqdm(torch.split(windows, batch_size), desc=desc, unit="batch", leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total += logits_nll(logits, batch).item()
            del logits
            count += batch[:, 1:].numel()
    return total, count


def perplexity(model, windows: torch.Tensor, corpus: str, batch_size: int = 1, desc: str = "perplexity") -> Perplexity:
    """Perplexity of `model` over token windows [n, seqlen] cut from `corpus` by `data.eval_windows`."""
    t0 = time.perf_counter()
    total, count = window_nll(model, windows, batch_size, desc=desc)
    nll = total / count
    return Perplexity(math.exp(nll), nll, corpus, windows.shape[1], windows.shape[0], count, time.perf_counter() - t0)
