"""Rewrite a quantized checkpoint from one on-disk layout to another, shard by shard.

Every supported format stores a quantized Linear layer as a few tensors next to the layer's name (`qweight`,
`scales`, ... or `weight_packed`, `weight_scale`, ...). A `Codec` reads those tensors into an exact `QWeight`
(integer codes, scales, integer zero points) and writes a `QWeight` back; `convert` streams the checkpoint one
shard at a time through a pair of codecs, copies every other tensor unchanged, and writes config.json last into
a hidden folder that is renamed into place only when complete — a crash leaves nothing that loads.

Because every conversion goes through the unpacked integers, the only place a format can lose information is
its zero-point convention (GPTQ v1 stores zero - 1), and each codec refuses what it cannot represent instead of
writing it wrong.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..checkpoint.safetensors_io import INDEX, CheckpointReader, save_safetensors_atomic, write_index
from ..errors import LlmqError
from ..io import atomic_dir, write_json_atomic
from ..numerics import QWeight, Scheme, dequantize
from .detect import read_config

# Files of a checkpoint folder that a conversion rewrites itself rather than copying, and weight files in other
# formats (a folder may ship .bin or .gguf copies of the same weights; the new checkpoint is safetensors only).
REWRITTEN = {"config.json", INDEX, "README.md", "report.json", "pytorch_model.bin.index.json"}
OTHER_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt"}


@dataclass(frozen=True)
class LayerShape:
    name: str
    in_features: int
    out_features: int


def embedding_shape(model: torch.nn.Module, name: str) -> LayerShape:
    """A token table [vocab, hidden] as the layer it is stored as: in_features = hidden, out_features = vocab."""
    table = model.get_submodule(name)
    return LayerShape(name, table.embedding_dim, table.num_embeddings)


@dataclass(frozen=True)
class DenseEmbedding:
    """A quantized token embedding that the target format cannot hold: written dequantized as `<name>.weight`."""

    layer: LayerShape  # in_features = the embedding width, out_features = the vocabulary
    codec: Codec  # how the source stores it
    scheme: Scheme
    dtype: torch.dtype  # what it is written in


class Codec(Protocol):
    """How one format stores the quantized weight of one Linear layer (bias is not its business)."""

    anchor: str  # the tensor suffix whose presence marks a quantized layer
    suffixes: tuple[str, ...]  # every suffix it reads (optional ones may be absent)

    def decode(self, tensors: dict[str, torch.Tensor], layer: LayerShape) -> QWeight: ...

    def encode(self, qw: QWeight, layer: LayerShape) -> dict[str, torch.Tensor]: ...


class ByLayer:
    """One codec per scheme, chosen by layer name: how a checkpoint whose layers differ in scheme is read or written.
    `make(scheme)` builds a format's codec; layers that `schemes` does not name take `default`. Facts a codec learns
    while converting (`inexact_scales`) are summed over the codecs."""

    def __init__(self, make: Callable[[Scheme], Codec], default: Scheme, schemes: dict[str, Scheme] | None = None):
        self.make, self.default, self.schemes = make, default, dict(schemes or {})
        self.codecs: dict[Scheme, Codec] = {}
        self.anchor, self.suffixes = self.codec_for_scheme(default).anchor, self.codec_for_scheme(default).suffixes

    @property
    def mixed(self) -> bool:
        return any(s != self.default for s in self.schemes.values())

    def scheme_for(self, layer: str) -> Scheme:
        return self.schemes.get(layer, self.default)

    def codec_for_scheme(self, scheme: Scheme) -> Codec:
        if scheme not in self.codecs:
            self.codecs[scheme] = self.make(scheme)
        return self.codecs[scheme]

    def codec(self, layer: str) -> Codec:
        return self.codec_for_scheme(self.scheme_for(layer))

    def decode(self, tensors: dict[str, torch.Tensor], layer: LayerShape) -> QWeight:
        return self.codec(layer.name).decode(tensors, layer)

    def encode(self, qw: QWeight, layer: LayerShape) -> dict[str, torch.Tensor]:
        return self.codec(layer.name).encode(qw, layer)

    @property
    def inexact_scales(self) -> int:
        return sum(getattr(c, "inexact_scales", 0) for c in self.codecs.values())


def linear_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """Every nn.Linear of `model` (a meta-device skeleton: see model.structure.skeleton) by full name."""
    return {n: LayerShape(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def quantized_layers(reader: CheckpointReader, codec: Codec, shapes: dict[str, LayerShape],
                     embedding: str | None = None) -> list[str]:
    """The quantized Linear layers of the checkpoint (`embedding`: a quantized token embedding, not one of them)."""
    suffix = "." + codec.anchor
    layers = sorted(k[: -len(suffix)] for k in reader.keys() if k.endswith(suffix) and k[: -len(suffix)] != embedding)
    unknown = [n for n in layers if n not in shapes]
    if unknown:
        raise LlmqError(f"{reader.folder}: quantized tensors for {unknown[0]!r}, which is not a Linear layer of this model's config")
    if not layers:
        raise LlmqError(f"{reader.folder}: no tensor ends in .{codec.anchor}: the weights do not match the config's quantization format")
    return layers


def read_layer(reader: CheckpointReader, name: str, codec: Codec) -> dict[str, torch.Tensor]:
    """The tensors `codec` stores for the layer `name`, keyed by suffix (optional ones absent when not on disk)."""
    wanted = [f"{name}.{s}" for s in codec.suffixes if f"{name}.{s}" in reader.weight_map]
    return {k.rsplit(".", 1)[1]: t for k, t in reader.read(wanted).items()}


def convert(
    src: Path,
    dst: Path,
    shapes: dict[str, LayerShape],
    decoder: Codec,
    encoder: Codec,
    quantization_config: Callable[[list[str]], dict[str, Any]],
    card: Callable[[], str] | None = None,
    overwrite: bool = False,
    desc: str = "converting",
    dense_embedding: DenseEmbedding | None = None,
) -> list[str]:
    """Stream `src` into a new checkpoint folder `dst`; returns the names of the converted layers. `shapes` are the
    model's Linear layers (`linear_shapes`), which say each quantized layer's true in/out features.

    `quantization_config(layers)` is called after every layer was converted (codecs may learn facts on the way, such
    as whether all zero points were symmetric), and its result goes into the new config.json. `dense_embedding`: a
    quantized token embedding written in full precision (the target format has no quantized embedding)."""
    src, dst = Path(src), Path(dst)
    reader = CheckpointReader(src)
    emb = dense_embedding
    layers = quantized_layers(reader, decoder, shapes, emb.layer.name if emb else None)
    owned = {f"{n}.{s}" for n in layers for s in decoder.suffixes}
    if emb is not None:
        owned |= {f"{emb.layer.name}.{s}" for s in emb.codec.suffixes}
    by_file: dict[str, list[str]] = {}
    for key, file in reader.weight_map.items():
        by_file.setdefault(file, []).append(key)
    anchors = {f"{n}.{decoder.anchor}": n for n in layers}
    with atomic_dir(dst, overwrite) as tmp:
        weight_map: dict[str, str] = {}
        for file in tqdm(reader.files(), desc=desc, unit="shard", leave=False):
            out = reader.read(k for k in by_file[file] if k not in owned)
            for key in by_file[file]:
                if emb is not None and key == f"{emb.layer.name}.{emb.codec.anchor}":
                    qw = emb.codec.decode(read_layer(reader, emb.layer.name, emb.codec), emb.layer)
                    out[f"{emb.layer.name}.weight"] = dequantize(qw, emb.scheme, emb.dtype).contiguous()
                if key not in anchors:
                    continue
                name = anchors[key]
                qw = decoder.decode(read_layer(reader, name, decoder), shapes[name])
                out.update({f"{name}.{s}": t.contiguous() for s, t in encoder.encode(qw, shapes[name]).items()})
            save_safetensors_atomic(out, tmp / file)
            weight_map.update(dict.fromkeys(out, file))
        if len(reader.files()) > 1 or (src / INDEX).is_file():
            write_index(tmp, weight_map)
        for f in src.iterdir():
            if f.is_file() and f.suffix not in OTHER_WEIGHTS and f.name not in REWRITTEN and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        config = read_config(src)
        config["quantization_config"] = quantization_config(layers)
        write_json_atomic(config, tmp / "config.json")
        if card is not None:
            (tmp / "README.md").write_text(card(), encoding="utf-8")
    return layers


def unquantized_linears(shapes: dict[str, LayerShape], quantized: list[str]) -> list[str]:
    done = set(quantized)
    return sorted(n for n in shapes if n not in done)
