"""Evaluation: the perplexity protocol, written once (DESIGN.md, "Protocols"), and a suite on one checkpoint.

Perplexity: the corpus is joined once and tokenized once, cut into non-overlapping windows of `seqlen` tokens (the
incomplete tail dropped, the first `max_windows` kept), and perplexity is exp(mean NLL) over every predicted
token: seqlen - 1 per window, since each window starts fresh. The result always carries seqlen, window count
and token count, because a perplexity without them cannot be compared with anything. (lm-eval's word perplexity
is the task `llmq_wikitext`: a different, larger number, never mixed with this one.)

Suites (`evaluate_suite`, used by `llmq eval` and a recipe's `eval.suite`): every task of a suite, and its
perplexity, on one checkpoint, each result looked up in the results store first by its key and evaluated (through
harness.py) only when missing; recovery against the base model is quantized / base score for accuracies.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import BadInputError


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


# ------------------------------------------------------------------------------------------------------- suites

LOWER_IS_BETTER = frozenset({"ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def recovery(metric: str, base: float, quantized: float) -> float | None:
    """quantized / base for a score where higher is better (DESIGN.md, "Protocols"); None for perplexities, whose
    comparison is the increase."""
    if metric in LOWER_IS_BETTER or not base:
        return None
    return quantized / base


def describe_checkpoint(spec: str, folder: Path, name: str | None = None, base: str | None = None) -> dict[str, Any]:
    """What a leaderboard row says about a checkpoint: name, kind, method, scheme, weight bits, size on disk, base."""
    from . import formats

    found = formats.detect(folder)
    qc = found.quantization_config
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    local = Path(spec).expanduser().exists()
    info: dict[str, Any] = {"name": name or (folder.name if local else spec), "kind": found.kind,
                            "label": found.label, "base": base}
    if found.kind == "full-precision":
        info.update(method="base", scheme=dtype, bits=8 * _DTYPE_BYTES.get(dtype, 4))
    elif found.kind == "llmq":
        recipe_file = folder / "recipe.yaml"
        method = "llmq"
        if recipe_file.is_file():
            import yaml

            recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
            method = str((recipe.get("method") or {}).get("name", method))
            info["base"] = base or recipe.get("model")
        group = qc.get("group_size")
        info.update(method=method, bits=qc.get("bits"),
                    scheme=f"W{qc.get('bits')}{'g' + str(group) if group not in (None, -1) else ' per-channel'} "
                           f"{'sym' if qc.get('sym') else 'asym'}")
    elif found.kind == "bitsandbytes":
        fmt = qc.get("bnb_4bit_quant_type", "nf4") if qc.get("load_in_4bit") else "int8"
        info.update(method="bitsandbytes", scheme=fmt, bits=4 if qc.get("load_in_4bit") else 8)
    elif found.kind == "compressed-tensors":
        weights, _ = formats.ct_weight_args(qc)
        info.update(method=found.kind, scheme=found.label, bits=(weights or {}).get("num_bits"))
    else:
        info.update(method=found.kind, scheme=found.label, bits=qc.get("bits"))
    info["size_bytes"] = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    return info


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class SuiteRun:
    model: dict[str, Any]  # describe_checkpoint
    checkpoint: str  # content hash
    suite: str
    records: list[dict[str, Any]] = field(default_factory=list)  # one per task (perplexity first), store records
    served: list[str] = field(default_factory=list)  # labels served from the store

    def by_label(self) -> dict[str, dict[str, Any]]:
        return {r["label"]: r for r in self.records}


def evaluate_suite(
    spec: str, suite, store=None, name: str | None = None, base: str | None = None, batch_size: int | None = None,
    model=None, tokenizer=None, say: Callable[[str], None] = print, data_parallel: bool = True,
) -> SuiteRun | None:
    """Every task of `suite` (suites.Suite) on the checkpoint `spec` (a folder, alias or hub id), served from
    `store` (results.ResultsStore) where its key is there. `model` / `tokenizer` skip loading (the caller loaded the
    same folder). Under `accelerate launch` the processes share the documents (lm-eval's data-parallel path) unless
    `data_parallel` is False (then only this process evaluates); None on the non-main processes."""
    from importlib.metadata import version

    from . import __version__, data, harness, models
    from .pipeline import is_main_process, world_size
    from .results import Key, ResultsStore, checkpoint_hash

    store = store if store is not None else ResultsStore()
    main = is_main_process() or not data_parallel
    procs = world_size() if data_parallel else 1
    lm_eval = version("lm_eval")
    folder = models.resolve(spec)
    digest = checkpoint_hash(folder)
    info = describe_checkpoint(spec, folder, name, base)
    run = SuiteRun(info, digest, suite.name)
    ppl = suite.perplexity
    plan = []  # (label, key, TaskSpec | None for perplexity, stored record | None)
    if ppl is not None:
        plan.append((f"ppl_{ppl.data}", Key(digest, suite.name, f"ppl:{ppl.data}:{ppl.seqlen}", 0, ppl.max_windows, __version__), None))
    for t in suite.tasks:
        plan.append((t.label, Key(digest, suite.name, t.task, t.shots, t.limit, __version__, lm_eval, procs), t))
    # Every process reads the store before any of them evaluates: results are written only after a task's
    # collective scoring ends, so all processes agree on what is missing.
    stored = store.get_many([key for _, key, _ in plan])
    plan = [(label, key, t, found) for (label, key, t), found in zip(plan, stored, strict=True)]
    if main:
        store.describe(digest, info)
    lm = None
    for label, key, t, stored in plan:
        if stored is not None:
            run.served.append(label)
            if main:
                say(f"{label}: served from the results store ({store.path}; evaluated {stored['created']})")
            run.records.append(stored)
            continue
        if model is None:
            say(f"loading {folder}")
            model, tokenizer = models.load_model(folder, bitsandbytes=True), models.load_tokenizer(folder)
        if t is None:
            if not main:
                continue
            windows = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text(ppl.data)), ppl.seqlen, ppl.max_windows)
            say(f"{label}: perplexity protocol, {windows.shape[0]} windows x {ppl.seqlen} tokens of {ppl.data!r}")
            p = perplexity(model, windows, ppl.data, ppl.batch_size, desc=label)
            metrics = {"ppl": p.ppl, "nll": p.nll, "seqlen": p.seqlen, "windows": p.windows, "tokens": p.tokens}
            run.records.append(store.put(key, metrics, p.windows, p.seconds, info, label=label, metric="ppl",
                                         corpus=ppl.data))
            continue
        if lm is None:
            lm = harness.wrap(model, tokenizer, batch_size, data_parallel)
        say(f"{label}: {t.shots}-shot, {t.limit or 'all'} documents")
        score = harness.run_task(lm, t.task, t.shots, t.limit, tuple(suite.include))
        if score is None:  # a non-main process of a data-parallel run
            continue
        if t.metric not in score.metrics:
            raise BadInputError(f"suite {suite.name!r}, task {label}: metric {t.metric!r} is not one it reports "
                                f"({', '.join(k for k in score.metrics if not k.endswith('_stderr'))})")
        run.records.append(store.put(key, score.metrics, score.samples, score.seconds, info, label=label, metric=t.metric))
    return run if main else None
