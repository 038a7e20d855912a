"""A suite on one checkpoint (`llmq eval`, a recipe's `eval.suite`): every task of the suite, and its perplexity,
each result looked up in the results store first by its key and evaluated (through harness.py) only when
missing. Under `accelerate launch` the processes share the documents."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .. import data
from ..environment import is_main_process, world_size
from ..errors import BadInputError
from ..io import check_output_file, write_json_atomic, write_text_atomic
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
    logged: dict[str, dict[str, list]] = field(default_factory=dict)  # label -> lm-eval's per-document records

    def by_label(self) -> dict[str, dict[str, Any]]:
        return {r["label"]: r for r in self.records}


def evaluate_suite(
    spec: str, suite, store=None, name: str | None = None, base: str | None = None, batch_size: int | None = None,
    model=None, tokenizer=None, data_parallel: bool = True, log_samples: bool = False,
) -> SuiteRun | None:
    """Every task of `suite` (suites.Suite) on the checkpoint `spec` (a folder, alias or hub id), served from
    `store` (results.ResultsStore) where its key is there. `model` / `tokenizer` skip loading (the caller loaded the
    same folder). Under `accelerate launch` the processes share the documents (lm-eval's data-parallel path) unless
    `data_parallel` is False (then only this process evaluates); None on the non-main processes. `log_samples`:
    evaluate every task afresh (stored results hold no per-document records) and keep lm-eval's records in
    `SuiteRun.logged`; the new results still go to the store."""
    store = store if store is not None else ResultsStore()
    main = is_main_process() or not data_parallel
    procs = world_size() if data_parallel else 1
    lm_eval = version("lm_eval")
    folder = resolve(spec)
    digest = checkpoint_hash(folder)
    info = describe_checkpoint(spec, folder, name, base)
    run = SuiteRun(info, digest, suite.store_name)
    ppl = suite.perplexity
    plan = []  # (label, key, TaskSpec | None for perplexity, stored record | None)
    if ppl is not None:
        plan.append((f"ppl_{ppl.data}", Key(digest, run.suite, f"ppl:{ppl.data}:{ppl.seqlen}", 0, ppl.max_windows, __version__), None))
    for t in suite.tasks:
        plan.append((t.label, Key(digest, run.suite, t.task, t.shots, t.limit, __version__, lm_eval, procs), t))
    # Every process reads the store before any of them evaluates: results are written only after a task's
    # collective scoring ends, so all processes agree on what is missing.
    stored = store.get_many([key for _, key, _ in plan]) if not log_samples else [None] * len(plan)
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
        score = harness.run_task(lm, t.task, t.shots, t.limit, tuple(suite.include), suite.chat_template, log_samples)
        if score is None:  # a non-main process of a data-parallel run
            continue
        if t.metric not in score.metrics:
            raise BadInputError(f"suite {suite.name!r}, task {label}: metric {t.metric!r} is not one it reports "
                                f"({', '.join(k for k in score.metrics if not k.endswith('_stderr'))})")
        run.records.append(store.put(key, score.metrics, score.samples, score.seconds, info, label=label, metric=t.metric))
        if score.logged is not None:
            run.logged[label] = score.logged
    if main and run.records:  # named only once something was scored: a checkpoint that fails to load leaves no trace
        store.describe(digest, info)
    return run if main else None


def suite_output(path: str | Path) -> Path:
    """Where `llmq eval --output-path` writes: the .json file named (refused if it exists: nothing is overwritten
    silently), or a new results_<time>.json in the folder named, as lm-eval names its own. Logged samples go beside
    it as samples_<task>_<same stem suffix>.jsonl (`samples_path`)."""
    path = Path(path).expanduser()
    if path.suffix == ".json":
        check_output_file(path, overwrite=False)
        return path
    if path.exists() and not path.is_dir():
        raise BadInputError(f"--output-path {path}: a file that is not .json; give a folder or a .json file")
    return path / f"results_{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H-%M-%S')}.json"


def samples_path(results: Path, task: str) -> Path:
    """The per-document records of `task` beside `results`, named after it (results_T.json → samples_<task>_T.jsonl)."""
    return results.with_name(f"samples_{task.removeprefix('llmq_')}_{results.stem.removeprefix('results_')}.jsonl")


def write_outputs(run: SuiteRun, suite, results: Path) -> list[Path]:
    """The run's results as JSON at `results` (each task's metrics, shots, limit, documents, whether served from the
    store) and, when samples were logged, lm-eval's per-document records as samples_<task>.jsonl beside it."""
    specs = {t.label: t for t in suite.tasks}
    rows = {}
    for r in run.records:
        t = specs.get(r["label"])
        rows[r["label"]] = {"task": r["task"], "metric": r.get("metric"), "metrics": r["metrics"], "shots": r["shots"],
                            "limit": r["limit"], "samples": r["samples"], "served_from_store": r["label"] in run.served,
                            **({"metric_used": t.metric} if t is not None else {})}
    doc = {"suite": run.suite, "checkpoint": run.checkpoint, "model": run.model, "chat_template": suite.chat_template,
           "llmq_version": __version__, "lm_eval_version": version("lm_eval"), "results": rows}
    results.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(doc, results)
    written = [results]
    for label, by_task in run.logged.items():
        for task, records in by_task.items():
            path = samples_path(results, task)
            check_output_file(path, overwrite=False)
            lines = [json.dumps(rec, default=str) for rec in records]
            written.append(write_text_atomic(path, "\n".join(lines) + "\n"))
    return written
