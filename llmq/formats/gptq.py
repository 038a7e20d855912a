"""GPTQ checkpoints (`quant_method: gptq`), as transformers + optimum + gptqmodel, vLLM and SGLang read them.

The tensor layout is llmq's own (README, FORMAT: `qweight` packed along the input dimension, `scales`
[groups, out], `qzeros` packed along the output dimension, `g_idx`); what differs is the zero point:

- v1 (`checkpoint_format: gptq`, what most servers expect) stores zero - 1. A zero point of 0 — an asymmetric
  group whose weights are all ≥ 0 — cannot be stored: it would wrap to 2**bits - 1, which every v1 loader reads
  back as 2**bits. Export refuses it (and says to use v2); import refuses a stored 2**bits - 1 the same way.
- v2 (`checkpoint_format: gptq_v2`, GPTQModel) stores the true zero point, as llmq does.

GPTQ quantizes the Linear layers inside the decoder blocks only, the same set in every block; an llmq checkpoint
that quantized anything else (an untied lm_head) or different layers in different blocks cannot be exported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .. import numerics
from ..errors import BadInputError, LlmqError
from ..numerics import QWeight, Scheme
from ..version import __version__
from .convert import LayerShape
from .native import check_codes, is_trivial_g_idx, unpack_gptq_layout

VERSIONS = {1: "gptq", 2: "gptq_v2"}


@dataclass
class GptqCodec:
    scheme: Scheme
    version: int = 1  # 1: stored zero = zero - 1; 2: the true zero
    dtype: torch.dtype = torch.float16  # of the scales it writes
    anchor: str = "qweight"
    suffixes: tuple[str, ...] = ("qweight", "scales", "qzeros", "g_idx")
    all_symmetric: bool = field(default=True, init=False)  # learnt while decoding: every zero is 2**(bits-1)

    def decode(self, t: dict[str, torch.Tensor], layer: LayerShape) -> QWeight:
        qw = unpack_gptq_layout(t, self.scheme, layer)
        zeros = qw.zeros + 1 if self.version == 1 else qw.zeros
        if self.version == 1 and int(zeros.max()) > self.scheme.maxq:
            n = int((zeros > self.scheme.maxq).sum())
            raise LlmqError(
                f"{layer.name}: {n} GPTQ v1 zero point(s) stored as {self.scheme.maxq}, i.e. zero {self.scheme.maxq + 1}, "
                f"outside the {self.scheme.bits}-bit range: the checkpoint was written with zero point 0, which v1 cannot "
                "store (it wraps), so its weights are not what its maker quantized"
            )
        self.all_symmetric &= bool((zeros == 1 << (self.scheme.bits - 1)).all())
        g_idx = None if is_trivial_g_idx(qw.g_idx, layer.in_features, self.scheme) else qw.g_idx
        return QWeight(qw.q, qw.scales, zeros, g_idx)

    def encode(self, qw: QWeight, layer: LayerShape) -> dict[str, torch.Tensor]:
        check_codes(qw, self.scheme, layer.name)
        if self.scheme.bits == 3 and (layer.in_features % 32 or layer.out_features % 32):
            raise BadInputError(
                f"{layer.name}: [{layer.out_features}, {layer.in_features}] — 3-bit GPTQ packs whole blocks of 32 values "
                "(3 words each) in both dimensions, and GPTQ loaders refuse a partial block; use compressed-tensors"
            )
        zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, 1 << (self.scheme.bits - 1), dtype=torch.int32)
        if self.version == 1:
            if bool((zeros == 0).any()):
                n = int((zeros == 0).sum())
                raise BadInputError(
                    f"{layer.name}: {n} group(s) have zero point 0, which GPTQ v1 (stored zero - 1) cannot represent; "
                    "export with --gptq-version 2 (checkpoint_format gptq_v2, read by GPTQModel) instead"
                )
            zeros = zeros - 1
        g_idx = qw.g_idx if qw.g_idx is not None else numerics.default_g_idx(layer.in_features, self.scheme)
        return numerics.pack_qweight(QWeight(qw.q, qw.scales, zeros, g_idx), self.scheme, self.dtype)


def scheme_of(qc: dict) -> Scheme:
    group = qc.get("group_size", 128)
    return Scheme(bits=int(qc["bits"]), group_size=None if group in (None, -1) else int(group), symmetric=bool(qc.get("sym", True)))


def version_of(qc: dict) -> int:
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    return 2 if fmt == "gptq_v2" else 1


def export_config(scheme: Scheme, version: int, has_g_idx: bool, block_prefix: str, per_block: list[list[str]],
                  all_in_blocks: list[str], schemes: dict[str, Scheme] | None = None) -> dict:
    """The `quantization_config` transformers' GPTQConfig (and vLLM) read, from an llmq checkpoint's facts. Layers
    whose scheme differs from `scheme` get a GPTQModel `dynamic` override each ("+:<exact name>$": bits, group_size,
    sym), which GPTQModel (and so transformers) and vLLM read."""
    config = {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size if scheme.group_size is not None else -1,
        "desc_act": has_g_idx,
        "sym": scheme.symmetric,
        "true_sequential": True,
        "checkpoint_format": VERSIONS[version],
        "block_name_to_quantize": block_prefix,
        "meta": {"quantizer": [f"llmq:{__version__}"]},
    }
    if per_block[0] != all_in_blocks:
        config["modules_in_block_to_quantize"] = [per_block[0]]
    own = {n: s for n, s in sorted((schemes or {}).items()) if s != scheme}
    if own:
        config["dynamic"] = {f"+:{re.escape(n)}$": {"bits": s.bits, "group_size": s.group_size if s.group_size is not None else -1,
                                                    "sym": s.symmetric} for n, s in own.items()}
    return config


def dynamic_schemes(qc: dict, layers: list[str]) -> dict[str, Scheme]:
    """Each layer's scheme under GPTQModel's `dynamic` overrides (regex → keys, "+:" or no prefix: the first pattern
    matching the start of the layer's name gives its keys over the config's; "-:" patterns skip the layer, so they
    decide nothing for a layer the file quantizes)."""
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise BadInputError("quantization_config.dynamic: expected a mapping of regex -> overrides")
    default, out = scheme_of(qc), {}
    for name in layers:
        for pattern, keys in dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], name):
                    break
                continue
            if re.match(pattern.removeprefix("+:"), name):
                if not isinstance(keys, dict):
                    raise BadInputError(f"quantization_config.dynamic.{pattern}: expected a mapping of overrides, got {keys!r}")
                # bits, group_size and sym decide the stored format; other keys (damp_percent, desc_act, ...) only
                # how it was quantized (g_idx is read from the files)
                stored = {k: keys[k] for k in ("bits", "group_size", "sym") if k in keys}
                out[name] = scheme_of({"bits": default.bits, "group_size": default.group_size or -1, "sym": default.symmetric,
                                       **stored})
                break
    return out


def block_layout(quantized: list[str], linears: list[str], block_prefix: str, n_blocks: int) -> tuple[list[list[str]], list[str]]:
    """The quantized layers of each decoder block (relative names) and all Linear layers of block 0; refuses
    what GPTQ cannot express (layers outside the blocks, different layers in different blocks)."""
    outside = [n for n in quantized if not n.startswith(block_prefix + ".")]
    if outside:
        raise BadInputError(f"{outside[0]} is quantized but lies outside the decoder blocks ({block_prefix}); GPTQ checkpoints quantize block layers only")
    per_block = [sorted(n.removeprefix(f"{block_prefix}.{i}.") for n in quantized if n.startswith(f"{block_prefix}.{i}.")) for i in range(n_blocks)]
    if any(b != per_block[0] for b in per_block):
        i = next(i for i, b in enumerate(per_block) if b != per_block[0])
        raise BadInputError(f"block {i} quantizes {per_block[i]} but block 0 quantizes {per_block[0]}; GPTQ needs the same layers in every block")
    in_block0 = sorted(n.removeprefix(f"{block_prefix}.0.") for n in linears if n.startswith(f"{block_prefix}.0."))
    return per_block, in_block0
