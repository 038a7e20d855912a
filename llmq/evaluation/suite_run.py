"""A suite on one checkpoint (`llmq eval`, a recipe's `eval.suite`): every task of the suite, and its perplexity,
each result looked up in the results store first by its key and evaluated (through harness.py) only when
missing. Under `accelerate launch` the processes share the documents."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from .. import data
from ..environment import is_main_process, world_size
from ..errors import BadInputError
from ..loading import load_model, load_tokenizer
from ..model.resolve import resolve
from ..version import __version__
from . import harness
from .checkpoint_info import describe_checkpoint
from .perplexity import perplexity
from .store import Key, ResultsStore, checkpoint_hash

logger = logging.getLogger(__name__)


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
    model=None, tokenizer=None, data_parallel: bool = True,
) -> SuiteRun | None:
    """Every task of `suite` (suites.Suite) on the checkpoint `spec` (a folder, alias or hub id), served from
    `store` (results.ResultsStore) where its key is there. `model` / `tokenizer` skip loading (the caller loaded the
    same folder). Under `accelerate launch` the processes share the documents (lm-eval's data-parallel path) unless
    `data_parallel` is False (then only this process evaluates); None on the non-main processes."""
    store = store if store is not None else ResultsStore()
    main = is_main_process() or not data_parallel
    procs = world_size() if data_parallel else 1
    lm_eval = version("lm_eval")
    folder = resolve(spec)
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
    lm = None
    for label, key, t, stored in plan:
        if stored is not None:
            run.served.append(label)
            if main:
                logger.info(f"{label}: served from the results store ({store.path}; evaluated {stored['created']})")
            run.records.append(stored)
            continue
        if model is None:
            logger.info(f"loading {folder}")
            model, tokenizer = load_model(folder, bitsandbytes=True), load_tokenizer(folder)
        if t is None:
            if not main:
                continue
            windows = data.eval_windows(data.tokenize_corpus(tokenizer, data.load_text(ppl.data)), ppl.seqlen, ppl.max_windows)
            logger.info(f"{label}: perplexity protocol, {windows.shape[0]} windows x {ppl.seqlen} tokens of {ppl.data!r}")
            p = perplexity(model, windows, ppl.data, ppl.batch_size, desc=label)
            metrics = {"ppl": p.ppl, "nll": p.nll, "seqlen": p.seqlen, "windows": p.windows, "tokens": p.tokens}
            run.records.append(store.put(key, metrics, p.windows, p.seconds, info, label=label, metric="ppl",
                                         corpus=ppl.data))
            continue
        if lm is None:
            lm = harness.wrap(model, tokenizer, batch_size, data_parallel)
        logger.info(f"{label}: {t.shots}-shot, {t.limit or 'all'} documents")
        score = harness.run_task(lm, t.task, t.shots, t.limit, tuple(suite.include))
        if score is None:  # a non-main process of a data-parallel run
            continue
        if t.metric not in score.metrics:
            raise BadInputError(f"suite {suite.name!r}, task {label}: metric {t.metric!r} is not one it reports "
                                f"({', '.join(k for k in score.metrics if not k.endswith('_stderr'))})")
        run.records.append(store.put(key, score.metrics, score.samples, score.seconds, info, label=label, metric=t.metric))
    if main and run.records:  # named only once something was scored: a checkpoint that fails to load leaves no trace
        store.describe(digest, info)
    return run if main else None
