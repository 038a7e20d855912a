"""Safetensors checkpoints on disk: read tensors on demand, write shards and the index so a crash leaves no
half-written file under a final name.

Shared by the block-by-block quantizer (quantization/blockwise.py) and the format converters (formats/): both stream a
checkpoint shard by shard instead of loading a whole model, so memory stays bounded by one shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import LlmqError
from ..io import removed_on_failure, write_json_atomic

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or sharded with an index), read one at a time on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
                raise LlmqError(f"{index}: not a valid safetensors index ({type(e).__name__})") from None
            bad = _foreign_shard_name(weight_map)
            if bad is not None:
                raise LlmqError(f"{index}: names {bad!r} as a shard; shards are .safetensors files in the checkpoint's own "
                                "folder")
        elif (self.folder / "model.safetensors").is_file():
            try:
                with safe_open(self.folder / "model.safetensors", framework="pt") as fh:
                    weight_map = {k: "model.safetensors" for k in fh.keys()}
            except (SafetensorError, OSError) as e:
                raise LlmqError(f"{self.folder / 'model.safetensors'}: corrupt or truncated safetensors file ({e})") from None
        else:
            raise LlmqError(f"{self.folder}: no model.safetensors or {INDEX} (llmq reads safetensors checkpoints only)")
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[str]:
        """The shard files in the order they first appear in the index (or the one file)."""
        return list(dict.fromkeys(self.weight_map.values()))

    def read(self, keys: Iterable[str], convert: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors `keys` as stored (or passed through `convert` one at a time, so the stored copy of only one
        tensor is alive at once), each file opened once for the read and closed after: safetensors maps files into
        memory, and pages of a mapping that stays open fill this process's RSS."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k not in self.weight_map:
                raise LlmqError(f"{self.folder}: the checkpoint has no tensor {k!r}")
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for name, file_keys in by_file.items():
            try:
                with safe_open(self.folder / name, framework="pt") as fh:
                    for k in file_keys:
                        out[k] = fh.get_tensor(k) if convert is None else convert(fh.get_tensor(k))
            except (SafetensorError, OSError) as e:
                raise LlmqError(f"{self.folder / name}: corrupt, truncated or missing safetensors file ({e})") from None
        return out

    def materialize(self, module: nn.Module, prefix: str, keys: list[str], device) -> None:
        """Replace the meta tensors `keys` (relative to `module`) with the checkpoint's, in fp32 on `device`."""
        missing = [prefix + k for k in keys if prefix + k not in self.weight_map]
        if missing:
            raise LlmqError(f"{self.folder}: the checkpoint has no tensor {missing[0]!r} that the model needs")

        def to_fp32(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype, copy=True)

        read = self.read((prefix + k for k in keys), convert=to_fp32)
        module.load_state_dict({k: read[prefix + k] for k in keys}, strict=False, assign=True)


def _foreign_shard_name(weight_map) -> str | None:
    """The first value of an index's weight_map that is not a plain .safetensors file name of this folder (a path, an
    absolute name, '..'), or repr of the map itself when it is not a mapping of names to names; None when all are."""
    if not isinstance(weight_map, dict):
        return repr(type(weight_map).__name__)
    for name in weight_map.values():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors") or name.startswith("."):
            return str(name)
    return None


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with removed_on_failure(tmp):
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)


def write_index(folder: Path, weight_map: dict[str, str]) -> None:
    """The standard `model.safetensors.index.json` that from_pretrained uses to find each tensor's shard."""
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, folder / INDEX)


def weights_bytes(folder: str | Path) -> int:
    """Size on disk of a checkpoint's weights: its safetensors files, else (a folder without any) its .bin files."""
    folder = Path(folder)
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def tensor_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of every tensor in a checkpoint's safetensors files, from their headers (no tensor is read)."""
    sizes = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return sizes


def files_stamp(folder: str | Path) -> list[str]:
    """'name:size:mtime' of the files that make a checkpoint what it is (weights, config, index), in name order: what
    caches and resumable runs key on, so a re-downloaded or edited checkpoint is never mistaken for the old one."""
    return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(Path(folder).iterdir())
            if f.suffix == ".safetensors" or f.name in ("config.json", INDEX)]
