"""Writing files and folders so that a crash or Ctrl-C never leaves something that looks like a finished checkpoint.

Everything is written into a hidden temporary file or folder next to the target and renamed into place only once
complete; a failure removes the temporary folder. An existing target is never replaced unless asked, and two runs
never write one output at once (`output_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """A temporary file that a failure (an error, a full disk, Ctrl-C) removes, so no half-written file lingers."""
    try:
        yield
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a text file through a hidden temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with removed_on_failure(tmp):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def check_output_file(target: Path, overwrite: bool) -> None:
    """Refuse an existing output file unless overwrite was asked for, and a folder in its place (before heavy work)."""
    target = Path(target)
    if target.exists() and (not overwrite or target.is_dir()):
        what = "is a folder" if target.is_dir() else "already exists (pass --overwrite to replace it)"
        raise BadInputError(f"output file {str(target)!r} {what}")


@contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path next to `target`; on success it becomes `target` in one rename. An existing
    target is refused before anything is written unless `overwrite` (an output file, unlike a resume file)."""
    target = Path(target)
    check_output_file(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    with removed_on_failure(tmp):
        yield tmp
        os.replace(tmp, target)


def torch_save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: internal resume files (activations, training state)."""
    tmp = path.with_name(path.name + ".tmp")
    with removed_on_failure(tmp):
        torch.save(obj, tmp)
        os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def check_output_free(target: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless overwrite was asked for (checked before any heavy work)."""
    if target.exists() and not overwrite:
        raise BadInputError(f"output folder {str(target)!r} already exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise BadInputError(f"output {str(target)!r} exists and is not a folder")


def move_into_place(tmp: Path, target: Path, overwrite: bool = False) -> None:
    """Rename the finished folder `tmp` to `target` (replacing it only when `overwrite`)."""
    check_output_free(target, overwrite)  # again: the folder may have appeared while we were writing
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def partial_dir(target: Path) -> Path:
    """Where a resumable job writing `target` keeps its unfinished work (hidden; never a loadable checkpoint
    because config.json is only written once the work is complete)."""
    return Path(target).parent / f".{Path(target).name}.partial"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on writing `target` (a hidden `.NAME.lock` file beside it, there only while held); a
    second writer of the same output is refused at once rather than mixing its work into the first one's."""
    target = Path(target)
    made = [p for p in [target.parent, *target.parent.parents] if not p.exists()]  # folders this call creates
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    try:
        with _held(lock, target):
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)  # while still holding it: a later writer makes a new file
    finally:
        for folder in made:  # deepest first; only what is still empty (nothing was written there)
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextmanager
def _held(lock: Path, target: Path) -> Iterator[None]:
    """flock on `lock`, retried when the file was replaced under us (its last holder removes it as it ends)."""
    for _ in range(5):
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BadInputError(f"another llmq run is writing {str(target)!r} (it holds {lock}); wait for it to end "
                                    "or choose another output") from None
            if lock.exists() and os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                yield
                return
    raise BadInputError(f"{lock}: could not take the lock on {str(target)!r} (it keeps being replaced)")


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
