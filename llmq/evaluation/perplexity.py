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


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity") -> tuple[float, int]:
    """Sum of next-token NLL over all windows [n, seqlen] and the number of predicted tokens."""
    device = next(model.parameters(), next(model.buffers())).device
    total, count = 0.0, 0
    with exact_dense(model):
        for batch in tqdm(torch.split(windows, batch_size), desc=desc, unit="batch", leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += batch[:, 1:].numel()
    return total, count


def perplexity(model, windows: torch.Tensor, corpus: str, batch_size: int = 1, desc: str = "perplexity") -> Perplexity:
    """Perplexity of `model` over token windows [n, seqlen] cut from `corpus` by `data.eval_windows`."""
    t0 = time.perf_counter()
    total, count = window_nll(model, windows, batch_size, desc=desc)
    nll = total / count
    return Perplexity(math.exp(nll), nll, corpus, windows.shape[1], windows.shape[0], count, time.perf_counter() - t0)
