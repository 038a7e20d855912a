"""Probe for issue 16's end-to-end stage (not built): a block-wise QAT checkpoint's codes frozen, the scales of all its
layers trained end to end (RoundingLinear, log-space scales, as the block stage trains them), then wiki perplexity
per the protocol (16 x 2048, fp32).

    python benchmarks/qat_e2e_probe.py CHECKPOINT {kd|ce} STEPS LR WINDOWS_PER_STEP

Data: the 64 x 512 lambada calibration windows of recipes/qat-w3g64.yaml. kd: cross-entropy to the base model's
top-64 next-token distribution (precomputed once); ce: next-token loss. Adam, learning rate decaying linearly to 0.

Measured 2026-12-03 (2 CPU cores): `python benchmarks/qat_e2e_probe.py out/qat-w3g64 kd 30 0.002 4` on the
block-wise W3g64 checkpoint (wiki 32.154; 0 steps reproduce it exactly): 1.66M trainable scales over 210 layers,
teacher top-64 in 123 s, 30 steps in 538 s (18 s a step of 2,048 tokens), wiki 32.202: no gain.
"""

import json
import sys
import time
import types

import torch
import torch.nn.functional as F

import llmq
from llmq import data, numerics
from llmq.calibration import calibration_batches
from llmq.checkpoint.quant_linear import QuantLinear
from llmq.evaluation.perplexity import perplexity
from llmq.methods.qat.fake_quant import RoundingLinear
from llmq.model.resolve import resolve

ckpt, loss_kind, steps, lr, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = llmq.load(ckpt, dtype=torch.float32)
tok = llmq.loading.load_tokenizer(ckpt)
recipe = llmq.Recipe.from_yaml("recipes/qat-w3g64.yaml")
windows = calibration_batches(recipe.calibration, tok)
method = recipe.method.model_copy(update={"train_weights": False, "learn_scales": True})
model.requires_grad_(False)
n = 0
for name, m in list(model.named_modules()):
    if isinstance(m, QuantLinear):
        qw = numerics.unpack_qweight(m.qweight, m.scales, m.qzeros, m.g_idx, m.scheme, m.in_features)
        fake = types.SimpleNamespace(in_features=m.in_features, out_features=m.out_features, bias=m.bias,
                                     weight=types.SimpleNamespace(dtype=torch.float32))
        qw = numerics.QWeight(qw.q.to(torch.uint8), qw.scales, qw.zeros if not m.scheme.symmetric else None, qw.g_idx)
        model.set_submodule(name, RoundingLinear(fake, qw, m.scheme, m.scales.dtype, method))
        n += 1
print("layers", n, flush=True)
params = [p for p in model.parameters() if p.requires_grad]
print("trainable", sum(p.numel() for p in params), flush=True)
teacher_top = None
K = 64
if loss_kind == "kd":
    base = llmq.load(resolve("smollm2-135m"), dtype=torch.float32).eval()
    t = time.perf_counter()
    vals, idx = [], []
    with torch.no_grad():
        for w in torch.split(windows, 4):
            lg = base(input_ids=w, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            v, i = lg.topk(K, dim=-1)
            vals.append(v)
            idx.append(i)
    teacher_top = (torch.cat(vals), torch.cat(idx))
    del base
    print(f"teacher top-{K}: {time.perf_counter()-t:.1f}s", flush=True)
opt = torch.optim.Adam(params, lr=lr)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
model.train()
perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
for step in range(steps):
    sel = perm[(torch.arange(bs) + step * bs) % windows.shape[0]]
    ids = windows[sel]
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    if loss_kind == "ce":
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    else:
        tv, ti = teacher_top[0][sel], teacher_top[1][sel]
        lp = logits.log_softmax(-1).gather(-1, ti)
        p = tv.exp()
        p = p / p.sum(-1, keepdim=True)
        loss = -(p * lp).sum(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    if step % 5 == 0 or step == steps - 1:
        print(f"step {step} loss {loss.item():.4f} {(time.perf_counter()-t0)/(step+1):.2f}s/step", flush=True)
train_s = time.perf_counter() - t0
model.eval()
wiki = data.eval_windows(data.tokenize_corpus(tok, data.load_text("wiki")), 2048, 16)
with torch.no_grad():
    ppl = perplexity(model, wiki, "wiki").ppl
print(json.dumps({"ckpt": ckpt, "loss": loss_kind, "steps": steps, "lr": lr, "bs": bs, "train_s": round(train_s, 1), "wiki": ppl}), flush=True)
