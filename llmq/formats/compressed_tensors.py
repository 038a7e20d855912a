"""compressed-tensors `pack-quantized` checkpoints (`quant_method: compressed-tensors`), as vLLM, SGLang and the
compressed-tensors package read them (llm-compressor writes them).

Per quantized Linear layer, for a weight [out, in] with G groups (1 per output channel for `strategy: channel`):

| tensor | dtype | shape | llmq equivalent |
|---|---|---|---|
| `weight_packed` | int32 | `[out, ceil(in*b/32)]` | `qweight` transposed: the same little-endian bit stream of codes |
| `weight_scale` | float | `[out, G]` | `scales` transposed |
| `weight_zero_point` | int32 | `[ceil(out*b/32), G]` | `qzeros` transposed (asymmetric schemes only) |
| `weight_shape` | int64 | `[2]` | `[out, in]` |

compressed-tensors stores codes and zero points as signed integers offset by 2**(b-1) before packing, so the packed
bits are exactly llmq's unsigned codes and true zero points; symmetric schemes have the implicit zero 2**(b-1).
Activation order with a per-column group index (`actorder: group`) is deprecated there and not exported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .. import numerics
from ..errors import BadInputError, LlmqError
from ..numerics import QWeight, Scheme
from .convert import LayerShape
from .native import check_codes, is_trivial_g_idx


@dataclass
class CompressedTensorsCodec:
    scheme: Scheme
    dtype: torch.dtype = torch.float16  # of the scales it writes
    anchor: str = "weight_packed"
    suffixes: tuple[str, ...] = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    def decode(self, t: dict[str, torch.Tensor], layer: LayerShape) -> QWeight:
        b, out, inp = self.scheme.bits, layer.out_features, layer.in_features
        if "weight_shape" in t and [int(x) for x in t["weight_shape"]] != [out, inp]:
            raise LlmqError(f"{layer.name}: weight_shape {t['weight_shape'].tolist()} differs from the config's [{out}, {inp}]")
        if "weight_g_idx" in t:
            raise LlmqError(f"{layer.name}: has weight_g_idx (activation order by group), which llmq does not import")
        if t["weight_packed"].shape != (out, numerics.packed_len(inp, b)):
            raise LlmqError(f"{layer.name}: weight_packed has shape {tuple(t['weight_packed'].shape)}, expected "
                            f"{(out, numerics.packed_len(inp, b))} for {b}-bit [{out}, {inp}]")
        q = numerics.unpack(t["weight_packed"].t().contiguous(), b, inp).t()
        scales = t["weight_scale"]
        if tuple(scales.shape) != (out, self.scheme.n_groups(inp)):
            raise LlmqError(f"{layer.name}: weight_scale has shape {tuple(scales.shape)}, expected {(out, self.scheme.n_groups(inp))}")
        zeros = None
        if not self.scheme.symmetric:
            if "weight_zero_point" not in t:
                raise LlmqError(f"{layer.name}: asymmetric scheme but no weight_zero_point")
            zp = t["weight_zero_point"]
            if zp.dtype != torch.int32:  # unpacked signed zero points (some writers skip packing them)
                zeros = (zp.to(torch.int32) + (1 << (b - 1))).reshape(out, -1)
            else:
                zeros = numerics.unpack(zp, b, out).to(torch.int32)
        return QWeight(q, scales, zeros, None)

    def encode(self, qw: QWeight, layer: LayerShape) -> dict[str, torch.Tensor]:
        check_codes(qw, self.scheme, layer.name)
        if not is_trivial_g_idx(qw.g_idx, layer.in_features, self.scheme):
            raise BadInputError(
                f"{layer.name}: has a per-column group order (g_idx, GPTQ act order without static groups), which "
                "compressed-tensors no longer supports; re-quantize with static_groups: true, or export as GPTQ"
            )
        b = self.scheme.bits
        tensors = {
            "weight_packed": numerics.pack(qw.q.t(), b).t(),
            "weight_scale": qw.scales.to(self.dtype),
            "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
        }
        mid = 1 << (b - 1)
        if self.scheme.symmetric:
            if qw.zeros is not None and bool((qw.zeros != mid).any()):
                raise LlmqError(f"{layer.name}: symmetric scheme but a zero point differs from {mid}")
        else:
            zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, mid, dtype=torch.int32)
            tensors["weight_zero_point"] = numerics.pack(zeros.to(torch.int32), b)
        return tensors


def scheme_of(weights: dict) -> Scheme:
    group = weights.get("group_size") if weights.get("strategy") == "group" else None
    return Scheme(bits=int(weights["num_bits"]), group_size=group, symmetric=bool(weights.get("symmetric", True)))


def weights_args(scheme: Scheme) -> dict:
    """The `weights` section of a config group for one llmq integer scheme."""
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "group" if scheme.group_size is not None else "channel",
        "group_size": scheme.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def export_config(schemes: dict[str, Scheme], ignore: list[str], default: Scheme | None = None) -> dict:
    """The `quantization_config` of a compressed-tensors checkpoint of weight-only int schemes: one config group
    targeting every Linear when all layers share a scheme, else one group per scheme naming its layers exactly,
    `default`'s group first (an import takes group_0's scheme as the llmq default)."""
    distinct = sorted(set(schemes.values()), key=lambda s: (s != default, s.bits, s.group_size or 0, s.symmetric))
    if len(distinct) == 1:
        targets = {distinct[0]: ["Linear"]}
    else:
        targets = {s: sorted(n for n, t in schemes.items() if t == s) for s in distinct}
    groups = {f"group_{i}": {"targets": targets[s], "weights": weights_args(s), "input_activations": None,
                             "output_activations": None, "format": "pack-quantized"} for i, s in enumerate(distinct)}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def layer_schemes(qc: dict, layers: list[str]) -> dict[str, Scheme]:
    """Each quantized layer's scheme from the config groups' targets, as compressed-tensors matches them: an exact
    module name first, then a `re:` pattern (matched at the start of the name), then the class name Linear (every
    quantized layer is one). Two groups claiming a layer at the same rank is an error."""
    groups = [(name, g.get("targets") or [], scheme_of(g.get("weights") or {})) for name, g in qc["config_groups"].items()]
    out = {}
    for layer in layers:
        for rank in (lambda t: t == layer, lambda t: t.startswith("re:") and re.match(t[3:], layer) is not None,
                     lambda t: t == "Linear"):
            hits = {(name, s) for name, targets, s in groups if any(rank(t) for t in targets)}
            if len({s for _, s in hits}) > 1:
                raise LlmqError(f"{layer}: config groups {', '.join(sorted(n for n, _ in hits))} both target it with "
                                "different schemes")
            if hits:
                out[layer] = next(iter(hits))[1]
                break
        else:
            raise LlmqError(f"{layer}: quantized in the files, but no config group targets it")
    return out
