"""Export to GGUF, llama.cpp's model file: `llmq export CKPT OUT.gguf --format gguf`.

Why it exists: laptops and edge boxes run models through llama.cpp and the apps built on it, which read GGUF only.
The export keeps llmq's integers: a quantized layer maps onto the llama.cpp block type whose grid is llmq's grid,
block by block of 32 input columns, so the GPTQ / QAT work survives the trip:

| llmq layer | GGUF type | value of a weight | exact when |
|---|---|---|---|
| 2/3/4-bit symmetric (zero 2^(b-1)), group a multiple of 32 or per-channel | Q4_0 | (c - 8)·d, c = q - 2^(b-1) + 8 | the scale is an fp16 value |
| 2/3/4-bit asymmetric | Q4_1 | c·d + m, c = q, d = s, m = -z·s | s and z·s are fp16 values |
| 8-bit symmetric | Q8_0 | c·d, c = q - 128 | the scale is an fp16 value |
| 6-bit symmetric | Q8_0 | c·d, c = q - 32 | the scale is an fp16 value |
| 5-bit symmetric / asymmetric | Q5_0 / Q5_1 | (c - 16)·d / c·d + m, c = q | as Q4_0 / Q4_1 |
| 6-bit symmetric, in_features a multiple of 256 | Q6_K | (c - 32)·k·d, c = q | scales k·d per 256 inputs, k ≤ 127 |
| 5-bit symmetric, same | Q5_K | c·k·d - k·16d, c = q | scales k·d per 256 inputs, k ≤ 63 |
| 4-bit symmetric, same | Q4_K | c·k·d - k·8d, c = q | scales k·d per 256 inputs, k ≤ 63 |
| 3-bit symmetric, same | Q3_K | (c - 4)·k·d, c = q | scales k·d per 256 inputs, k ≤ 32 |
| 2-bit symmetric, same | Q2_K | c·k·d - k·2d, c = q | scales k·d per 256 inputs, k ≤ 15 |

The K-quant rows need scales on the K-quant grid (one fp16 d per super-block of 256 inputs, integer multiples of it
per group: `method.gguf_grid`, numerics.kquant_scales); a layer whose scales are on it takes its K-quant, exactly.

A group of 64 or 128 is two or four blocks of 32 with the same scale, exact. Scales that are not fp16 values are
rounded to the nearest one (relative change ≤ 2^-11; the export says how many layers and how much): a recipe with
`output.dtype: float16` stores its scales on the fp16 grid, and its export is exact. What GGUF cannot hold is
refused with a message: 8-bit with zero points, group sizes that are not a multiple of 32, act-order column
orders (g_idx), codebook formats. Full-precision checkpoints export too (every matrix in F16 / F32), which is what
llama.cpp's own quantizer starts from.

The tensor names, the query / key row order (llama.cpp's rotary layout interleaves what Hugging Face's halves)
and the metadata keys follow llama.cpp's Llama conventions; the tokenizer (byte-level BPE: tokens, types, merges,
special ids, chat template) travels in the file, so llama.cpp runs it as is. Llama-architecture models only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import numerics
from ..checkpoint.config import LlmqConfig
from ..checkpoint.safetensors_io import CheckpointReader
from ..errors import BadInputError
from ..io import atomic_file, check_output_file
from ..model.structure import skeleton
from ..numerics import QWeight, Scheme, dequantize
from .convert import ByLayer, LayerShape, embedding_shape, linear_shapes, read_layer
from .detect import Detected, detect, read_config
from .native import LlmqCodec, is_trivial_g_idx

BLOCK = 32  # llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks
EMBEDDING_TYPES = ("f32", "f16", "q8_0")
BLOCK_NAMES = {  # Hugging Face Llama module (inside model.layers.N) -> llama.cpp tensor (inside blk.N)
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@dataclass
class Rounding:
    """How many layers fp16 moved, and the largest move."""

    layers: int = 0
    worst: float = 0.0

    def add(self, change: float) -> None:
        self.layers += change > 0
        self.worst = max(self.worst, change)


@dataclass
class GgufExport:
    """What `export_gguf` wrote."""

    source: Detected
    output: Path
    layers: int  # quantized matrices written in a block type
    types: dict[str, int] = field(default_factory=dict)  # GGUF type name -> tensors
    notes: list[str] = field(default_factory=list)


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp tensor name of a Hugging Face Llama parameter name without its .weight suffix (None: unknown)."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner = BLOCK_NAMES.get(".".join(parts[3:]))
        return None if inner is None else f"blk.{parts[2]}.{inner}"
    return None


def rotary_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's Llama expects for q_proj / k_proj: within each head, rows (0, d/2, 1, d/2 + 1, ...),
    the interleaved rotary pairs, instead of Hugging Face's first half / second half."""
    head_dim = n_rows // heads
    idx = torch.arange(n_rows).reshape(heads, 2, head_dim // 2)
    return idx.transpose(1, 2).reshape(n_rows)


def block_type(scheme: Scheme, qw: QWeight, layer: LayerShape) -> str:
    """The GGUF block type of a layer (Q6_K / Q5_K / Q4_K / Q3_K / Q2_K, Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0), or a
    BadInputError saying why GGUF cannot hold it exactly. A symmetric layer whose scales lie on the K-quant grid
    (method.gguf_grid) takes its K-quant."""
    if scheme.format != "int":
        raise BadInputError(f"{layer.name}: {scheme.format} codes have no GGUF block type with the same levels")
    if not is_trivial_g_idx(qw.g_idx, layer.in_features, scheme):
        raise BadInputError(f"{layer.name}: a per-column group order (g_idx, GPTQ act order without static groups) cannot "
                            "be stored in GGUF; re-quantize with static_groups: true")
    centre = 1 << (scheme.bits - 1)
    symmetric = bool(torch.all(qw.zeros == centre))
    as_symmetric = replace(scheme, symmetric=True)
    kquant = numerics.kquant_type(as_symmetric, layer.in_features) if symmetric else None
    if kquant is not None and numerics.kquant_factors(qw.scales, as_symmetric) is not None:
        return kquant
    group = scheme.group_size_for(layer.in_features)
    if group % BLOCK or layer.in_features % BLOCK:
        raise BadInputError(f"{layer.name}: group size {group} over {layer.in_features} inputs is not made of llama.cpp's "
                            f"blocks of {BLOCK}; use group_size 32, 64, 128 or per-channel with in_features a multiple of "
                            f"{BLOCK}, or a symmetric 2/3/6-bit group of 16 on the K-quant grid (method.gguf_grid, "
                            f"in_features a multiple of {numerics.SUPER_BLOCK})")
    if scheme.bits in (6, 8):
        if not symmetric:
            raise BadInputError(f"{layer.name}: {scheme.bits}-bit with zero points has no GGUF block type (Q8_0 and Q6_K "
                                "are symmetric); quantize with symmetric: true")
        return "Q8_0"  # 6-bit codes fit Q8_0's int8 exactly (Q6_K, smaller, needs the K-quant grid)
    if scheme.bits == 5:
        return "Q5_0" if symmetric else "Q5_1"
    return "Q4_0" if symmetric else "Q4_1"


def encode_blocks(qw: QWeight, scheme: Scheme, kind: str) -> tuple[np.ndarray, float, float]:
    """The layer's rows as llama.cpp blocks [out, in/32 * bytes per block] (uint8), and how far fp16 moved the
    values: the largest relative change of a scale, and (Q4_1 / Q5_1) of a block minimum -z·s measured in scales
    (0.0: exact)."""
    n, k = qw.q.shape
    per_group = scheme.group_size_for(k) // BLOCK
    s = qw.scales.double().repeat_interleave(per_group, dim=1)  # [n, k/32]
    z = qw.zeros.double().repeat_interleave(per_group, dim=1)
    q = qw.q.to(torch.int32).reshape(n, k // BLOCK, BLOCK)
    d = s.to(torch.float16)
    scale_change = _relative_change(s, d, s)
    centre = 1 << (scheme.bits - 1)
    if kind == "Q8_0":
        codes = (q - centre).to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([_f16_bytes(d), codes], axis=-1).reshape(n, -1), scale_change, 0.0
    min_change = 0.0
    if kind in ("Q4_0", "Q5_0"):  # (c - 8)·d or (c - 16)·d
        codes = q - centre + (8 if kind == "Q4_0" else 16)
        head = [_f16_bytes(d)]
    else:  # Q4_1 / Q5_1: value = c·d + m with c = q, m = -z·s
        codes = q
        m = (-z * s).to(torch.float16)
        min_change = _relative_change(-z * s, m, s)
        head = [_f16_bytes(d), _f16_bytes(m)]
    codes = codes.to(torch.uint8).numpy()
    if kind in ("Q5_0", "Q5_1"):  # bit 4 of code i is bit i of a little-endian uint32
        high = ((codes >> 4).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
        head.append(high.astype("<u4")[..., None].view(np.uint8))
        codes = codes & np.uint8(15)
    packed = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << np.uint8(4))  # low nibbles: the first 16
    return np.concatenate([*head, packed], axis=-1).reshape(n, -1), scale_change, min_change


def encode_kquant(qw: QWeight, scheme: Scheme, kind: str) -> np.ndarray:
    """The layer's rows as K-quant super-blocks [out, in/256 * bytes per block] (uint8): llmq's symmetric codes q
    with scales k·d (`numerics.kquant_factors`), laid out as llama.cpp's dequantizers read them (gguf's
    `quants.py`). Every value is exact: (q - 2^(b-1))·k·d."""
    n, k_in = qw.q.shape
    scheme = replace(scheme, symmetric=True)
    d, k = numerics.kquant_factors(qw.scales, scheme)  # [n, nb] fp16, [n, nb, groups per super-block]
    _, sub, _ = numerics.KQUANTS[scheme.bits]
    rows = n * (k_in // numerics.SUPER_BLOCK)
    k = k.repeat_interleave(scheme.group_size // sub, dim=-1).reshape(rows, -1).numpy()  # one multiple per sub-block
    d = d.reshape(rows).numpy()
    q = qw.q.to(torch.uint8).reshape(rows, numerics.SUPER_BLOCK).numpy()
    if kind == "Q6_K":  # low 4 bits, high 2 bits, int8 scales k, d: value d·k·(c - 32), c = q
        ql, qh = _pack_fields(q & 15, 4, 64), _pack_fields(q >> 4, 2, 32)
        return np.concatenate([ql, qh, k.astype(np.int8).view(np.uint8), _f16_bytes(torch.from_numpy(d))], 1).reshape(n, -1)
    if kind in ("Q4_K", "Q5_K"):  # d, dmin = 2^(b-1)·d, 12 bytes of 6-bit scales k and mins k (the offset 2^(b-1)·k·d),
        high = k[:, 4:] >> 4     # (Q5_K: a bit plane of q >> 4), 4-bit codes
        scales = np.concatenate([k[:, :4] | (high << 6), k[:, :4] | (high << 6), (k[:, 4:] & 15) | ((k[:, 4:] & 15) << 4)], 1)
        codes = _pack_fields(q & 15, 4, 32)
        planes = [] if kind == "Q4_K" else [_pack_fields(q >> 4, 1, 32)]
        return np.concatenate([_f16_bytes(torch.from_numpy(d)),
                               _f16_bytes(torch.from_numpy(d * np.float16(1 << (scheme.bits - 1)))),
                               scales, *planes, codes], 1).reshape(n, -1)
    low2 = _pack_fields(q & 3, 2, 32)
    if kind == "Q2_K":  # 16 bytes of scales k | mins k << 4 (the offset 2·k·d with dmin = 2·d), 2-bit codes, d, dmin
        return np.concatenate([k | (k << 4), low2, _f16_bytes(torch.from_numpy(d)),
                               _f16_bytes(torch.from_numpy(d * np.float16(2)))], 1).reshape(n, -1)
    # Q3_K: a bit plane of q >> 2 (llama.cpp subtracts 4 where it is 0), the low 2 bits, 6-bit scales u = 32 - k
    # with the block scale -d (value -d·(u - 32) = k·d), d
    hmask = _pack_fields(q >> 2, 1, 32)
    u = (32 - k.astype(np.int16)).astype(np.uint8)
    scales = np.concatenate([_pack_fields(u & 15, 4, 8), _pack_fields(u >> 4, 2, 4)], 1)
    return np.concatenate([hmask, low2, scales, _f16_bytes(torch.from_numpy(-d))], 1).reshape(n, -1)


def _pack_fields(values: np.ndarray, bits: int, run: int) -> np.ndarray:
    """`bits`-bit fields [rows, m] packed as llama.cpp's K-quants lay them out: the values in chunks of 8 / bits runs of
    `run` values each; run j of a chunk fills bits [j·bits, (j+1)·bits) of that chunk's `run` bytes. (4-bit codes in
    runs of 32: sub-blocks 2c and 2c + 1 share bytes; 1-bit planes in runs of 32: element e at bit e // 32.)"""
    per_byte = 8 // bits
    fields = values.reshape(values.shape[0], -1, per_byte, run)
    shifts = (bits * np.arange(per_byte, dtype=np.uint8)).reshape(1, 1, per_byte, 1)
    return np.bitwise_or.reduce(fields << shifts, axis=2).reshape(values.shape[0], -1)


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float16)[..., None].view(np.uint8)


def _relative_change(exact: torch.Tensor, rounded: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest |rounded - exact| in units of the block's scale."""
    return float(((rounded.double() - exact).abs() / scale.abs().clamp_min(1e-30)).max()) if exact.numel() else 0.0


def export_gguf(src: str | Path, dst: str | Path, embeddings: str = "f16", tokenizer_pre: str | None = None,
                overwrite: bool = False) -> GgufExport:
    """Write the llmq or full-precision Llama checkpoint `src` as the GGUF file `dst` (see the module docstring)."""
    import gguf

    src, dst = Path(src), Path(dst)
    if embeddings not in EMBEDDING_TYPES:
        raise BadInputError(f"embeddings {embeddings!r}: expected one of {', '.join(EMBEDDING_TYPES)}")
    if dst.suffix != ".gguf":
        raise BadInputError(f"{dst}: a GGUF export is one file; name it *.gguf")
    check_output_file(dst, overwrite)  # before the work; again when the file is put in place
    found = detect(src)
    if found.kind not in ("llmq", "full-precision"):
        raise BadInputError(f"{src} is {found.label}; `llmq export --format gguf` reads llmq and full-precision checkpoints "
                            "(`llmq import` brings GPTQ and compressed-tensors checkpoints into llmq first)")
    config = read_config(src)
    _check_architecture(src, config)
    codec = None
    model = skeleton(src)
    shapes = linear_shapes(model)
    if found.kind == "llmq":
        cfg = LlmqConfig(**{k: v for k, v in found.quantization_config.items() if k != "quant_method"})
        schemes = {n: cfg.scheme_for(n) for n in cfg.layers}
        emb = cfg.embedding_plan
        if emb is not None:  # the table is a Linear-shaped layer: in = the embedding width, out = the vocabulary
            shapes[emb.name] = embedding_shape(model, emb.name)
            schemes[emb.name] = emb.scheme
        codec = ByLayer(lambda s: LlmqCodec(s, has_g_idx=cfg.g_idx), cfg.scheme, schemes)
    reader = CheckpointReader(src)
    result = GgufExport(found, dst, 0)
    writer = gguf.GGUFWriter(path=None, arch="llama")
    _write_metadata(writer, config, src.name)
    notes = _write_tokenizer(writer, src, config, tokenizer_pre)
    scales_moved, mins_moved = Rounding(), Rounding()
    tensors = _tensor_names(reader)
    for hf_name, kind in tensors.items():
        name = gguf_name(hf_name)
        if name is None:
            raise BadInputError(f"{src}: tensor {hf_name!r} has no llama.cpp Llama counterpart")
        rows = _row_order(hf_name, config)
        if kind == "quantized":
            layer = shapes[hf_name]
            qw = codec.decode(read_layer(reader, hf_name, codec), layer)
            if rows is not None:
                qw = QWeight(qw.q[rows], qw.scales[rows], qw.zeros[rows], qw.g_idx)
            scheme = codec.scheme_for(hf_name)  # a mixed checkpoint's layers each get their own block type
            try:
                qtype = block_type(scheme, qw, layer)
            except BadInputError as e:
                if name != "token_embd":
                    raise
                # llama.cpp reads its token table in any type: written as dense matrices are, and said so
                qtype = _write_dense(writer, gguf, f"{name}.weight", dequantize(qw, scheme), embeddings)
                notes.append(f"{hf_name}: {str(e).split(': ', 1)[1]}; written dequantized as {qtype} (the 8-bit "
                             "symmetric per-row embedding, W8-sym, maps onto Q8_0 exactly)")
                result.types[qtype] = result.types.get(qtype, 0) + 1
                continue
            if qtype.endswith("_K"):  # exact by construction: kquant_factors reproduced every scale
                data = encode_kquant(qw, scheme, qtype)
            else:
                data, scale_change, min_change = encode_blocks(qw, scheme, qtype)
                scales_moved.add(scale_change)
                mins_moved.add(min_change)
            writer.add_tensor(f"{name}.weight", data, raw_dtype=gguf.GGMLQuantizationType[qtype])
            result.layers += 1
        else:
            t = reader.read([f"{hf_name}.weight"])[f"{hf_name}.weight"].float()
            if rows is not None:
                t = t[rows]
            qtype = _write_dense(writer, gguf, f"{name}.weight", t, embeddings)
        result.types[qtype] = result.types.get(qtype, 0) + 1
    writer.add_file_type(_file_type(gguf, result.types))
    if scales_moved.layers:
        notes.append(f"{scales_moved.layers} quantized layer(s) had scales off the fp16 grid, rounded to fp16 (largest "
                     f"relative change {scales_moved.worst:.2g}); quantize with output.dtype: float16 (or method.gguf_grid) for exact scales")
    if mins_moved.layers:
        notes.append(f"{mins_moved.layers} asymmetric layer(s): Q4_1 stores the block minimum -z·s in fp16 (Q5_1 too), "
                     f"which moved it by up to {mins_moved.worst:.2g} of a quantization step; symmetric schemes (Q4_0, Q5_0, "
                     "Q8_0, the K-quants) export exactly")
    result.notes = notes
    with atomic_file(dst, overwrite) as tmp:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return result


def _check_architecture(src: Path, config: dict) -> None:
    arch = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") != "llama" or arch != "LlamaForCausalLM":
        raise BadInputError(f"{src}: {arch} ({config.get('model_type')}); the GGUF export writes Llama-architecture models "
                            "(LlamaForCausalLM) only for now")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise BadInputError(f"{src}: rope type {rope.get('rope_type')!r}; the GGUF export writes plain rotary embeddings only")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise BadInputError(f"{src}: {key} is set; llama.cpp's Llama has no biases")


def _write_metadata(writer, config: dict, name: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_quantization_version(2)


def _write_tokenizer(writer, src: Path, config: dict, pre: str | None) -> list[str]:
    """Byte-level BPE tokenizer metadata (what llama.cpp calls the 'gpt2' model). Returns notes."""
    import gguf

    path = src / "tokenizer.json"
    if not path.is_file():
        raise BadInputError(f"{src}: no tokenizer.json; a GGUF file carries its tokenizer, and llama.cpp needs it")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
        vocab: dict[str, int] = model["vocab"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{path}: not a tokenizers JSON file this export reads ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(tok.get("pre_tokenizer")):
        raise BadInputError(f"{path}: a {model.get('type')} tokenizer; the GGUF export writes byte-level BPE tokenizers only")
    size = config["vocab_size"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in [*vocab.items(), *((a["content"], i) for i, a in added.items())]:
        if i < size:
            tokens[i] = text
            types[i] = gguf.TokenType.NORMAL
    for i, a in added.items():
        if i < size:
            types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    notes = []
    if pre is None:
        pre = "default"
        notes.append("tokenizer pre-split rule written as llama.cpp's 'default' (pass --tokenizer-pre, e.g. smollm, "
                     "for the model's own); token ids and merges are the model's")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < size:
            add(value)
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)
    return notes


def _tensor_names(reader: CheckpointReader) -> dict[str, str]:
    """Every module the file needs, in checkpoint order: name -> 'quantized' | 'dense'."""
    out: dict[str, str] = {}
    for key in reader.keys():
        module, _, suffix = key.rpartition(".")
        if suffix == "qweight":
            out[module] = "quantized"
        elif suffix == "weight":
            out.setdefault(module, "dense")
        elif suffix not in ("scales", "qzeros", "g_idx"):
            raise BadInputError(f"{reader.folder}: tensor {key!r} has no place in a llama.cpp Llama file")
    # a tied lm_head is not in the checkpoint, and not in the file: llama.cpp then uses token_embd as its output matrix
    return out


def _row_order(hf_name: str, config: dict) -> torch.Tensor | None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if hf_name.endswith("self_attn.q_proj"):
        return rotary_rows(heads * head_dim, heads)
    if hf_name.endswith("self_attn.k_proj"):
        kv = config.get("num_key_value_heads") or heads
        return rotary_rows(kv * head_dim, kv)
    return None


def _write_dense(writer, gguf, name: str, t: torch.Tensor, embeddings: str) -> str:
    """A full-precision tensor: norms (1-D) in F32 as llama.cpp keeps them; matrices in the `embeddings` type."""
    if t.dim() == 1 or embeddings == "f32":
        writer.add_tensor(name, t.numpy().astype(np.float32))
        return "F32"
    if embeddings == "f16":
        writer.add_tensor(name, t.numpy().astype(np.float16))
        return "F16"
    if t.shape[-1] % BLOCK:
        raise BadInputError(f"{name}: {t.shape[-1]} columns are not blocks of {BLOCK}; use --embeddings f16")
    data = gguf.quants.quantize(t.numpy().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    return "Q8_0"


def _file_type(gguf, types: dict[str, int]) -> int:
    """general.file_type: the block type most matrices use ('mostly Q4_0' ...), F32 / F16 for full precision."""
    ftypes = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
              "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K, "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
              "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_S,
              "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16, "F32": gguf.LlamaFileType.ALL_F32}
    quantized = {k: v for k, v in types.items() if k not in ("F32", "F16", "Q8_0")}
    pick = max(quantized, key=quantized.get) if quantized else ("Q8_0" if "Q8_0" in types else "F16" if "F16" in types else "F32")
    return int(ftypes[pick])
