"""Exploratory QAT learning-rate probe (as run once for the QAT issue): W3g64 from plain RTN, 10 steps of 4 x 512
lambada tokens, wiki perplexity on only 4 x 2048 tokens (a quick look, not the protocol's 16 windows).

    python benchmarks/qat_probe.py 3 64

Measured 2026-11-23 (2 CPU cores; only the first setting finished before it was stopped): base 20.642, RTN init
65.158, lr = qparam_lr = 1e-5 -> 59.928 after 10 steps (KD loss 1.246 -> 0.997), 280 s of training.
"""
import copy
import sys
import time

import torch

from llmq import data, loading
from llmq.evaluation.perplexity import perplexity
from llmq.model.resolve import resolve
from llmq.quantization import qat
from llmq.recipe import Recipe

base = resolve("smollm2-135m")
tok = loading.load_tokenizer(base)
ev = data.eval_windows(data.tokenize_corpus(tok, data.load_text("wiki")), 2048, 4)
tr = data.eval_windows(data.tokenize_corpus(tok, data.load_text("lambada")), 512, None)
print("train windows", tr.shape, flush=True)
m0 = loading.load_model(base, dtype=torch.float32)
print("base", perplexity(m0, ev, "wiki").ppl, flush=True)
bits, gs = int(sys.argv[1]), int(sys.argv[2])
for lr, qlr in [(1e-5, 1e-5), (5e-5, 5e-5), (2e-4, 2e-4)]:
    m = copy.deepcopy(m0)
    r = Recipe.from_dict({"model": "smollm2-135m", "method": {"name": "qat", "init": "rtn"}, "scheme": {"bits": bits, "group_size": gs},
        "training": {"seqlen": 512, "batch_size": 4, "micro_batch_size": 4, "budget": {"steps": 10}, "lr": lr, "qparam_lr": qlr, "warmup": 0.1}})
    t = time.perf_counter()
    res = qat.quantize_model(m, r, torch.float32, tr, evaluate_init=(lambda mm: print("init", perplexity(mm, ev, "wiki").ppl, flush=True)) if lr == 1e-5 else None)
    print(lr, qlr, "train s", res.train.seconds, "losses", [round(x, 3) for x in res.train.losses], flush=True)
    print(lr, qlr, "qat ppl", perplexity(m, ev, "wiki").ppl, "total", time.perf_counter() - t, flush=True)
