"""The results store: every evaluation result, keyed by what determines it, in one append-only JSON Lines file.

Why it exists: evaluations cost minutes to hours, and a leaderboard is only as honest as its rows are comparable.
A result's key is (checkpoint content hash, suite, task, shots, limit, llmq version, lm-eval version, processes):
the same key is served from the store instead of being recomputed (and the caller says so), a checkpoint whose
files changed gets a new hash and is evaluated again, and a new llmq or lm-eval version starts fresh rows. (The number of data-parallel processes
is in the key because lm-eval draws few-shot examples from one random sequence per process: 1 and 2 processes
score the same documents with different shots.) Not in the key: edits to a task's YAML or data files of your own
(`include`); rename the suite when you change them. `llmq leaderboard` builds from this file alone.

Each line is one record: a result, or a checkpoint description (``"description": true``: the newest one names
the checkpoint in tables). A result has the key fields, the scores (`metrics`, with standard errors), the
documents scored, the seconds it took, when, and a description of the checkpoint (name, kind, method, scheme,
bits, size on disk, base model) so a table can be drawn without the checkpoint at hand. Appends are single `write` calls of whole lines
under an exclusive lock, each starting on a fresh line; a line that is not a readable JSON object (a crash
mid-write, bad bytes) is skipped with a warning naming its line, never fatal.

Deliberately not here: evaluating (suite_run.py), drawing tables (reporting/leaderboard.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..environment import cache_dir

# Files that decide a checkpoint's outputs (weights, config, tokenizer); cards, reports and recipes do not.
_HASHED = ("*.safetensors", "*.bin", "*.gguf", "config.json", "generation_config.json", "tokenizer*.json",
           "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


def default_store() -> Path:
    """$LLMQ_RESULTS, else results.jsonl in llmq's cache folder ($LLMQ_CACHE, default ~/.cache/llmq)."""
    env = os.environ.get("LLMQ_RESULTS")
    return Path(env) if env else cache_dir() / "results.jsonl"


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over the names and bytes of the files that decide the checkpoint's outputs, in name order."""
    folder = Path(folder)
    files = sorted({p for pattern in _HASHED for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{folder}: no weights or config to hash")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


@dataclass(frozen=True)
class Key:
    checkpoint: str  # content hash
    suite: str
    task: str  # lm-eval task name, or ppl:<data>:<seqlen> for the perplexity protocol
    shots: int
    limit: int | None  # documents per task (windows for perplexity); None = all
    llmq_version: str
    lm_eval_version: str = ""  # "" for the perplexity protocol, which does not use lm-eval
    processes: int = 1  # data-parallel processes: lm-eval's few-shot draws depend on how documents are split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResultsStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_store()

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first."""
        if not self.path.is_file():
            return []
        out = []
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    record = None
                if isinstance(record, dict):
                    out.append(record)
                else:  # a torn write, a foreign line, a JSON value that is not a record: skipped, never fatal
                    warnings.warn(f"{self.path}:{n}: unreadable record skipped (torn write or not a JSON object)",
                                  stacklevel=2)
        return out

    def results(self) -> list[dict[str, Any]]:
        """The result records (descriptions left out), oldest first."""
        return [r for r in self.records() if not r.get("description")]

    def get(self, key: Key) -> dict[str, Any] | None:
        """The newest result with exactly this key, or None."""
        return self.get_many([key])[0]

    def get_many(self, keys: list[Key]) -> list[dict[str, Any] | None]:
        """`get` for several keys, reading the file once."""
        newest: dict[str, dict[str, Any]] = {}
        wanted = {json.dumps(k.to_dict(), sort_keys=True): k.to_dict() for k in keys}
        for r in self.results():
            for text, fields in wanted.items():
                if {k: r.get(k) for k in fields} == fields:
                    newest[text] = r
        return [newest.get(json.dumps(k.to_dict(), sort_keys=True)) for k in keys]

    def put(self, key: Key, metrics: dict[str, float], samples: int, seconds: float, model: dict[str, Any],
            **extra: Any) -> dict[str, Any]:
        """Append one result record and return it."""
        record = {**key.to_dict(), "metrics": metrics, "samples": samples, "seconds": round(seconds, 3),
                  "created": _now(), "model": model, **extra}
        self._append(record)
        return record

    def describe(self, checkpoint: str, model: dict[str, Any]) -> None:
        """Record what a checkpoint is called and made from (name, base, ...) when that differs from the newest
        record of it: a rerun served from the store with a new `--name` or `--base` still reaches the leaderboard."""
        known = [r["model"] for r in self.records() if r.get("checkpoint") == checkpoint and "model" in r]
        if not known or known[-1] != model:
            self._append({"checkpoint": checkpoint, "description": True, "created": _now(), "model": model})

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
        with self.path.open("a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a writer died mid-line: start ours on a fresh line, keep both
                        line = b"\n" + line
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
