"""The llmq layout (README, FORMAT) as a codec, and the llmq quantization_config of an imported checkpoint."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .. import numerics
from ..checkpoint.config import LlmqConfig
from ..errors import LlmqError
from ..numerics import QWeight, Scheme
from .convert import LayerShape


def is_trivial_g_idx(g_idx: torch.Tensor | None, in_features: int, scheme: Scheme) -> bool:
    """True when g_idx says nothing beyond "column j is in group j // group_size"."""
    return g_idx is None or torch.equal(g_idx.to(torch.int32), numerics.default_g_idx(in_features, scheme))


@dataclass
class LlmqCodec:
    """qweight / scales / qzeros (true zero points) / g_idx, exactly as numerics.pack_qweight writes them."""

    scheme: Scheme
    dtype: torch.dtype = torch.float32  # of the scales it writes
    has_g_idx: bool = False
    anchor: str = "qweight"
    suffixes: tuple[str, ...] = ("qweight", "scales", "qzeros", "g_idx")
    inexact_scales: int = field(default=0, init=False)  # layers whose scales changed when cast to `dtype`

    def decode(self, t: dict[str, torch.Tensor], layer: LayerShape) -> QWeight:
        return unpack_gptq_layout(t, self.scheme, layer)

    def encode(self, qw: QWeight, layer: LayerShape) -> dict[str, torch.Tensor]:
        check_codes(qw, self.scheme, layer.name)
        if self.has_g_idx and qw.g_idx is None:
            qw = qw._replace(g_idx=numerics.default_g_idx(layer.in_features, self.scheme))
        elif not self.has_g_idx:
            if not is_trivial_g_idx(qw.g_idx, layer.in_features, self.scheme):
                raise LlmqError(f"{layer.name}: has a column group order (g_idx) but the target is written without one")
            qw = qw._replace(g_idx=None)
        tensors = numerics.pack_qweight(qw, self.scheme, self.dtype)
        self.inexact_scales += not torch.equal(tensors["scales"].to(qw.scales.dtype), qw.scales.t())
        return tensors


def unpack_gptq_layout(t: dict[str, torch.Tensor], scheme: Scheme, layer: LayerShape) -> QWeight:
    """qweight / scales / qzeros / g_idx (llmq's and GPTQ's layout) → QWeight with the stored zero points, after
    checking every shape against the layer, so a foreign or damaged file is refused rather than misread."""
    k, n, b = layer.in_features, layer.out_features, scheme.bits
    if scheme.group_size is not None and k % scheme.group_size:
        raise LlmqError(f"{layer.name}: in_features {k} is not a multiple of group_size {scheme.group_size} (llmq needs whole groups)")
    g = scheme.n_groups(k)
    expected = {"qweight": (numerics.packed_len(k, b), n), "scales": (g, n), "qzeros": (g, numerics.packed_len(n, b)), "g_idx": (k,)}
    for key, shape in expected.items():
        if key in t and tuple(t[key].shape) != shape:
            raise LlmqError(f"{layer.name}.{key}: shape {tuple(t[key].shape)}, expected {shape} for {b}-bit [{n}, {k}] "
                            f"with {g} group(s)")
        if key != "g_idx" and key not in t:
            raise LlmqError(f"{layer.name}: no {key} tensor")
    return numerics.unpack_qweight(t["qweight"], t["scales"], t["qzeros"], t.get("g_idx"), scheme, k)


def check_codes(qw: QWeight, scheme: Scheme, name: str) -> None:
    """Codes and zero points must fit in `bits` bits before anything packs them (packing would spill bits)."""
    for what, t in (("weight code", qw.q), ("zero point", qw.zeros)):
        if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) > scheme.maxq):
            raise LlmqError(f"{name}: {what} {int(t.max()) if int(t.max()) > scheme.maxq else int(t.min())} is outside "
                            f"0..{scheme.maxq}, the range of {scheme.bits}-bit codes")


def imported_config(scheme: Scheme, ignore: list[str], has_g_idx: bool, schemes: dict[str, Scheme] | None = None) -> dict:
    """quantization_config of an imported checkpoint: every Linear but the unquantized ones, named exactly; `schemes`
    gives layers their own scheme where it differs from `scheme`."""
    return LlmqConfig.from_scheme(scheme, targets=[".*"], ignore=[re.escape(n) for n in ignore], g_idx=has_g_idx,
                                  schemes=schemes).to_dict()
