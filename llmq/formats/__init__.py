"""Checkpoint formats other than llmq's own: export llmq checkpoints to what servers read, import theirs.

    llmq export out/w4 out/w4-gptq --format gptq                 # transformers (optimum + gptqmodel), vLLM, SGLang
    llmq export out/w4 out/w4-ct --format compressed-tensors     # vLLM, SGLang, compressed-tensors
    llmq export out/w4 out/w4.gguf --format gguf                 # llama.cpp and the apps built on it (gguf_export.py)
    llmq import some-gptq-model out/imported                     # → llmq QuantLinear layers, llmq kernels and eval

Conversions are exact: both directions go through the unpacked integer codes, scales and zero points (`QWeight`),
and a format that cannot represent a value refuses it with a message rather than writing it wrong (see
gptq.py for the one such case, zero point 0 in GPTQ v1). `llmq.load` imports a supported foreign checkpoint
into a cached llmq copy on first use, so evaluation and kernels run on it transparently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import describe, numerics
from ..checkpoint.config import LlmqConfig
from ..checkpoint.safetensors_io import CheckpointReader, files_stamp
from ..environment import cache_dir, dtype_of_config
from ..errors import BadInputError
from ..model.structure import decoder_blocks, skeleton
from ..numerics import Scheme
from ..reporting.cards import export_card, import_card
from . import compressed_tensors, gguf_export, gptq
from .convert import (
    ByLayer,
    DenseEmbedding,
    convert,
    embedding_shape,
    linear_shapes,
    quantized_layers,
    unquantized_linears,
)
from .detect import Detected, ct_weight_args, detect, read_config, unsupported_message
from .native import LlmqCodec, imported_config, is_trivial_g_idx

EXPORT_FORMATS = ("gptq", "compressed-tensors", "gguf")

__all__ = ["EXPORT_FORMATS", "ConversionResult", "Detected", "detect", "export_checkpoint", "import_checkpoint", "imported_copy"]


@dataclass(frozen=True)
class ConversionResult:
    source: Detected
    output_dir: Path
    layers: int
    format: str  # what was written: "gptq v1", "gptq v2", "compressed-tensors pack-quantized", "llmq"
    notes: tuple[str, ...] = ()


def _llmq_source(src: Path) -> tuple[Detected, LlmqConfig, ByLayer, torch.dtype]:
    found = detect(src)
    if found.kind != "llmq":
        raise BadInputError(f"{src} is {found.label}, not an llmq checkpoint; `llmq export` reads llmq checkpoints "
                            "(`llmq import` brings GPTQ and compressed-tensors checkpoints into llmq first)")
    cfg = LlmqConfig(**{k: v for k, v in found.quantization_config.items() if k != "quant_method"})
    if cfg.scheme.format != "int":
        raise BadInputError(f"{src} holds {cfg.scheme.format} codes, not an integer grid: GPTQ and compressed-tensors "
                            "store (q - z) * s only")
    decoder = ByLayer(lambda s: LlmqCodec(s, has_g_idx=cfg.g_idx), cfg.scheme, {n: cfg.scheme_for(n) for n in cfg.layers})
    return found, cfg, decoder, dtype_of_config(read_config(src))


def export_checkpoint(src: str | Path, dst: str | Path, format: str, gptq_version: int = 1, overwrite: bool = False,
                      embeddings: str = "f16", tokenizer_pre: str | None = None) -> ConversionResult:
    """Write the llmq checkpoint `src` as a GPTQ (v1 or v2) or compressed-tensors pack-quantized checkpoint, or as a
    GGUF file (`embeddings`: the type of its full-precision matrices; `tokenizer_pre`: llama.cpp's pre-split rule).
    Per-layer schemes become GPTQModel's `dynamic` overrides, or one compressed-tensors config group per scheme."""
    src, dst = Path(src), Path(dst)
    if format not in EXPORT_FORMATS:
        raise BadInputError(f"export format {format!r} is not supported (expected one of {', '.join(EXPORT_FORMATS)})")
    if format == "gguf":
        done = gguf_export.export_gguf(src, dst, embeddings, tokenizer_pre, overwrite)
        label = "gguf " + ", ".join(f"{k}: {v}" for k, v in sorted(done.types.items()))
        return ConversionResult(done.source, dst, done.layers, label, tuple(done.notes))
    if gptq_version not in gptq.VERSIONS:
        raise BadInputError(f"GPTQ version {gptq_version} does not exist (expected 1 or 2)")
    found, cfg, decoder, dtype = _llmq_source(src)
    scheme = decoder.default
    model = skeleton(src)
    shapes = linear_shapes(model)
    dense_embedding = embedding_in_full_precision(cfg, model, dtype)
    layers = quantized_layers(CheckpointReader(src), decoder, shapes,
                              dense_embedding.layer.name if dense_embedding else None)
    schemes = {n: decoder.scheme_for(n) for n in layers}
    odd = next((n for n, s in schemes.items() if s.bits not in numerics.PEER_BITS), None)
    if odd is not None:
        raise BadInputError(f"{odd}: {schemes[odd].bits}-bit; {format} loaders read {', '.join(map(str, numerics.PEER_BITS))}-bit "
                            "weights (5- and 6-bit layers export to GGUF, or stay in llmq's format)")
    if format == "gptq":
        prefix, blocks = decoder_blocks(model)
        per_block, in_block0 = gptq.block_layout(layers, list(shapes), prefix, len(blocks))
        encoder = ByLayer(lambda s: gptq.GptqCodec(s, gptq_version, dtype), scheme, schemes)
        config = gptq.export_config(scheme, gptq_version, cfg.g_idx, prefix, per_block, in_block0, schemes)
        label = f"gptq v{gptq_version}"
    else:
        if cfg.g_idx:
            raise BadInputError(
                f"{src} stores a per-column group order (g_idx: GPTQ act order without static groups), which "
                "compressed-tensors no longer supports; re-quantize with static_groups: true, or export as GPTQ"
            )
        encoder = ByLayer(lambda s: compressed_tensors.CompressedTensorsCodec(s, dtype), scheme, schemes)
        config = compressed_tensors.export_config(schemes, unquantized_linears(shapes, layers), scheme)
        label = "compressed-tensors pack-quantized"
    notes = []
    if dense_embedding is not None:
        notes.append(embedding_note(dense_embedding, label.split(" ")[0]))
    if encoder.mixed:
        label += f" ({len(set(schemes.values()))} schemes)"
        split = _split_fused(schemes)
        if split:
            notes.append(f"{split}: vLLM fuses these projections into one matmul and runs them in one scheme (the first "
                         "one's); quantize with a budget (it ties them) or give them one override")
        if format == "gptq":
            notes.append("per-layer schemes are written as GPTQModel `dynamic` overrides, which GPTQModel's loader "
                         "reads; transformers' GPTQ loader (optimum) ignores them and would rebuild those layers in the "
                         "default scheme, and vLLM matches them against its fused layer names (qkv_proj, gate_up_proj), "
                         "which per-projection overrides do not name: load this export with GPTQModel, or export as "
                         "compressed-tensors for transformers and vLLM")
    convert(src, dst, shapes, decoder, encoder, lambda _: config, card=lambda: export_card(src, label, config), overwrite=overwrite,
            desc=f"exporting as {label}", dense_embedding=dense_embedding)
    return ConversionResult(found, dst, len(layers), label, tuple(notes))


def embedding_in_full_precision(cfg: LlmqConfig, model: torch.nn.Module, dtype: torch.dtype) -> DenseEmbedding | None:
    """How a checkpoint's quantized token embedding is read and written out dequantized (None: it has none)."""
    plan = cfg.embedding_plan
    if plan is None:
        return None
    return DenseEmbedding(embedding_shape(model, plan.name), LlmqCodec(plan.scheme), plan.scheme, dtype)


def embedding_note(emb: DenseEmbedding, fmt: str) -> str:
    bits = describe.scheme_words(emb.scheme.bits, emb.scheme.group_size, emb.scheme.symmetric, short=True)
    size = emb.layer.in_features * emb.layer.out_features * torch.finfo(emb.dtype).bits // 8
    dtype = str(emb.dtype).removeprefix("torch.")
    exact = "the same values" if emb.dtype == torch.float32 else f"the same values rounded to {dtype}"
    return (f"{emb.layer.name}: {fmt} has no quantized embedding, so the {bits} table is written dequantized in "
            f"{dtype} ({size / 1e6:.3g} MB: {exact}, a larger file)")


# Projections vLLM fuses into one matmul (its Llama-family packed modules): they need one scheme in a served export.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _split_fused(schemes: dict[str, Scheme]) -> str | None:
    """The first set of fused projections whose schemes differ, in words, or None."""
    for name in sorted(schemes):
        parent, _, leaf = name.rpartition(".")
        for group in FUSED:
            if leaf == group[0]:
                found = {f"{parent}.{g}": schemes.get(f"{parent}.{g}") for g in group}
                if len({s for s in found.values() if s is not None}) > 1:
                    return f"{parent}.{'/'.join(group)} have different schemes"
    return None


def import_checkpoint(src: str | Path, dst: str | Path, overwrite: bool = False) -> ConversionResult:
    """Write the GPTQ or compressed-tensors checkpoint `src` as an llmq checkpoint (QuantLinear layers); per-layer
    schemes (GPTQModel's `dynamic`, several compressed-tensors config groups) are kept per layer."""
    src, dst = Path(src), Path(dst)
    found = detect(src)
    if not found.importable:
        raise BadInputError(unsupported_message(src, found, "imports"))
    qc = found.quantization_config
    dtype = dtype_of_config(read_config(src))
    shapes = linear_shapes(skeleton(src))
    if found.kind == "gptq":
        version = gptq.version_of(qc)
        decoder = ByLayer(lambda s: gptq.GptqCodec(s, version), gptq.scheme_of(qc))
        names = quantized_layers(CheckpointReader(src), decoder, shapes)
        decoder.schemes = gptq.dynamic_schemes(qc, names)
        g_idx = _any_real_g_idx(src, decoder, shapes)
    else:
        decoder = ByLayer(compressed_tensors.CompressedTensorsCodec, compressed_tensors.scheme_of(ct_weight_args(qc)[0]))
        names = quantized_layers(CheckpointReader(src), decoder, shapes)
        decoder.schemes = compressed_tensors.layer_schemes(qc, names)
        g_idx = False
    encoder = ByLayer(lambda s: LlmqCodec(s, dtype, has_g_idx=g_idx), decoder.default, decoder.schemes)

    def imported(s: Scheme) -> Scheme:
        """GPTQ states symmetry for a whole config; a scheme whose zero points were all 2**(bits-1) is symmetric."""
        if found.kind != "gptq":
            return s
        return Scheme(s.bits, s.group_size, decoder.codec_for_scheme(s).all_symmetric)

    def llmq_config(layers: list[str]) -> dict:
        schemes = {n: imported(decoder.scheme_for(n)) for n in layers}
        return imported_config(imported(decoder.default), unquantized_linears(shapes, layers), g_idx, schemes)

    layers = convert(src, dst, shapes, decoder, encoder, llmq_config, card=lambda: import_card(src, found), overwrite=overwrite,
                     desc="importing")
    notes = []
    if encoder.inexact_scales:
        notes.append(f"{encoder.inexact_scales} layer(s) had scales rounded to the model's dtype {dtype} (the file stores another dtype)")
    return ConversionResult(found, dst, len(layers), "llmq", tuple(notes))


def _any_real_g_idx(src: Path, codec: ByLayer, shapes: dict) -> bool:
    """Whether some layer's g_idx is more than the trivial j // group_size (read before converting: the llmq
    config's g_idx flag holds for every layer). Reads only the small [in] g_idx tensors."""
    reader = CheckpointReader(src)
    keys = [k for k in reader.keys() if k.endswith(".g_idx") and k.removesuffix(".g_idx") in shapes]
    return any(not is_trivial_g_idx(t, shapes[n].in_features, codec.scheme_for(n))
               for k, t in reader.read(keys).items() for n in [k.removesuffix(".g_idx")])


def imported_copy(src: str | Path) -> Path:
    """A cached llmq copy of the foreign checkpoint `src` (made once, keyed by its path and files' sizes and times)."""
    src = Path(src).resolve()
    stamp = [str(src), *files_stamp(src)]
    target = cache_dir() / "imported" / f"{src.name}-{hashlib.sha256(chr(10).join(stamp).encode()).hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        import_checkpoint(src, target, overwrite=target.exists())
    return target
