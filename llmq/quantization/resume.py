"""Whether a partial output folder belongs to this run, so a killed run resumes and a different one never does.

A resumable run (the block walk's progress file, QAT's training state) records a key. It covers everything that
decides the result: the recipe (content hash), the base model folder and its files (names, sizes, modification
times: a re-downloaded or edited base restarts), and the token windows the run calibrates or trains on (an
edited calibration file restarts). A partial folder with another key is refused with a message, never reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..checkpoint.safetensors_io import files_stamp
from ..errors import LlmqError
from ..recipe import Recipe

PROGRESS = "llmq-progress.json"
ACTIVATIONS = "llmq-activations.pt"
BUDGET = "llmq-budget.json"  # the schemes a budget chose (pipeline.stages.choose_schemes), kept for the resume


def run_key(recipe: Recipe, base_dir: Path, *windows: torch.Tensor | None) -> str:
    """What a resumable partial run must match: the recipe, the base model's folder and files, the token windows."""
    digest = hashlib.sha256("\n".join(files_stamp(base_dir)).encode())
    for w in windows:
        if w is not None:
            digest.update(repr(tuple(w.shape)).encode() + w.detach().cpu().contiguous().numpy().tobytes())
    return f"{recipe.hash()}:{Path(base_dir).resolve()}:{digest.hexdigest()[:16]}"


def blocks_done(work: Path, key: str, n_blocks: int | None = None) -> int:
    """How many blocks (of `n_blocks`) an interrupted run of this same job finished in `work` (0 for a fresh
    folder)."""
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / PROGRESS
    if progress_path.is_file():
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            progress = None
        done = progress.get("blocks_done") if isinstance(progress, dict) else None
        if type(done) is not int or done < 0 or (n_blocks is not None and done > n_blocks):
            raise LlmqError(f"{progress_path} is not a progress file llmq wrote; remove {work} to start over")
        if progress.get("run") != key:
            raise LlmqError(f"{work} holds an interrupted run of a different recipe, model or calibration data; "
                            "remove it to start over")
        return int(progress["blocks_done"])
    if any(p.name != BUDGET for p in work.iterdir()):
        raise LlmqError(f"{work} is not empty and holds no llmq progress file; remove it to start over")
    return 0


def _progress_field(work: Path, key: str):
    """One field of the progress file (None when the file or the field cannot be read)."""
    try:
        return json.loads((work / PROGRESS).read_text(encoding="utf-8")).get(key)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def spent_block_seconds(work: Path) -> float:
    """The seconds a block-wise QAT run with a time budget had spent when it recorded its last finished block (0
    when its progress file does not say): a resumed run counts them against the same budget."""
    spent = _progress_field(work, "block_seconds_spent")
    return float(spent) if isinstance(spent, (int, float)) and spent >= 0 else 0.0


def planned_step_seconds(work: Path) -> float | None:
    """The seconds a training step took when the run last measured one, as its progress file records them (None: not
    recorded); a resumed run re-plans from it after a block its plan gave no steps."""
    seconds = _progress_field(work, "block_step_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None


def planned_block_steps(work: Path) -> int | None:
    """The training steps per block a block-wise QAT run with a time budget planned, as its progress file records
    them (None: not planned yet). Read after `blocks_done` accepted the file."""
    steps = _progress_field(work, "block_steps")
    if steps is not None and (type(steps) is not int or steps < 0):
        raise LlmqError(f"{work / PROGRESS}: block_steps {steps!r} is not a step count llmq wrote; remove {work} to start over")
    return steps
