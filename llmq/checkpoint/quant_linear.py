"""The runtime side of an llmq checkpoint: QuantLinear and the swap of nn.Linear layers for it.

Methods (methods/*.py) decide *which* integers a weight becomes and return `QWeight`s; this module only turns
those into a module that holds the packed tensors and runs a kernel. The buffer names (`qweight`, `scales`,
`qzeros`, `g_idx`, `bias`) are the safetensors keys on disk: a public, versioned format (README, FORMAT).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .. import kernels, numerics
from ..describe import scheme_words
from ..numerics import QWeight, Scheme


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored as packed n-bit integers with per-group scales and zero points."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: Scheme,
        dtype: torch.dtype = torch.float32,
        has_g_idx: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = scheme.n_groups(in_features)
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(numerics.packed_len(in_features, scheme.bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype, **kw))
        self.register_buffer("qzeros", torch.zeros(n_groups, numerics.packed_len(out_features, scheme.bits), dtype=torch.int32, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw) if has_g_idx else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.choose_kernel(torch.device(device or "cpu"))

    def choose_kernel(self, device: torch.device, name: str | None = None) -> None:
        """Pick the matmul for `device` (kernels.select); `name` forces one ('auto' = the default choice)."""
        forced = None if name in (None, "auto") else name
        # a layer on the meta device (from_pretrained builds them there) cannot run: choose at its first real forward
        self.kernel = kernels.torch_ref.linear if device.type == "meta" else kernels.select(self.scheme, device, forced)
        self._kernel_name, self._kernel_device = forced, device
        kernels.drop_derived(self)  # a kernel's own copy of the weights is rebuilt if that kernel comes back

    def load_qweight(self, qw: QWeight) -> None:
        """Pack an exact QWeight into this layer's buffers."""
        for name, t in numerics.pack_qweight(qw, self.scheme, self.scales.dtype).items():
            buf = getattr(self, name)
            if buf is None or buf.shape != t.shape:
                raise ValueError(f"{name}: expected shape {None if buf is None else tuple(buf.shape)}, got {tuple(t.shape)}")
            buf.copy_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self._kernel_device:  # the model moved since the kernel was chosen
            self.choose_kernel(x.device, self._kernel_name)
        return self.kernel(x, self)

    def extra_repr(self) -> str:
        s = self.scheme
        words = scheme_words(s.bits, s.group_size, s.symmetric, short=True)
        return f"in={self.in_features}, out={self.out_features}, {words}, bias={self.bias is not None}"


def replace_linears(
    model: nn.Module,
    scheme: Scheme | Mapping[str, Scheme],
    names: list[str],
    dtype: torch.dtype,
    qweights: dict[str, QWeight] | None = None,
    has_g_idx: bool = False,
) -> None:
    """Swap the named nn.Linear layers for QuantLinear (on the Linear's device, meta included) and, when
    `qweights` is given, pack each layer's QWeight into it. `scheme`: one for every layer, or each layer's by name."""
    for name in names:
        layer_scheme = scheme[name] if isinstance(scheme, Mapping) else scheme
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        ql = QuantLinear(
            lin.in_features, lin.out_features, lin.bias is not None, layer_scheme, dtype, has_g_idx, device=lin.weight.device
        )
        if qweights is not None:
            ql.load_qweight(qweights[name])
            if lin.bias is not None:
                ql.bias.data.copy_(lin.bias.data.to(dtype))
        setattr(parent, child, ql)
