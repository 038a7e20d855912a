"""QAT's layers: fake-quantized Linear layers that train through their rounding, and the conversion back to exact
integers. `RoundingLinear` is block-wise QAT's layer (block_ap.py): frozen init codes, trained scales and rounding
offsets. `FakeQuantLinear` is whole-model QAT's, which runs in three steps (quantization/qat.py):

1. prepare: the targeted Linear layers become `FakeQuantLinear`s, started from a PTQ result (`init: rtn | gptq`:
   the weights, scales and zero points that method chose). Their forward is `numerics.fake_quantize_learnable`,
   i.e. exactly `dequantize(quantize(w))`, with straight-through rounding so the latent weights and (LSQ-style)
   the scales and zero points can learn.
2. train: training.py's loop (distillation from the full-precision model by default).
3. convert: `numerics.quantize` of the trained weights with the trained scales and (rounded) zero points — the
   same QWeights a PTQ method returns, packed into the same format. The converted model computes exactly what
   the fake-quant model computed (zero tolerance, tested).

Only the targeted Linear layers train; embeddings, norms and the (ignored) lm_head keep the base model's values.
Unlike RTN, GPTQ and block-wise QAT, whole-model QAT needs the whole model in memory (a forward and backward pass
through all of it), so it does not use the one-block-at-a-time walk on disk — only, in memory, for its
initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ... import numerics
from ...numerics import QWeight, Scheme
from ...recipe import MethodConfig, Recipe


class FakeQuantLinear(nn.Module):
    """A Linear layer that trains through its quantization: latent fp32 weight, scales and zero points as
    parameters (frozen or not), forward on the dequantized integer weight."""

    def __init__(self, linear: nn.Linear, init: QWeight, scheme: Scheme, scale_dtype: torch.dtype, method: MethodConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme, self.scale_dtype = scheme, scale_dtype
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=method.train_weights)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        self.scales = nn.Parameter(init.scales.detach().float().clone(), requires_grad=method.learn_scales)
        zeros = None if init.zeros is None or scheme.symmetric else init.zeros.detach().float().clone()
        self.zeros = None if zeros is None else nn.Parameter(zeros, requires_grad=method.learn_zero_points)
        self.register_buffer("g_idx", None if init.g_idx is None else init.g_idx.clone())

    def stored_scales(self) -> torch.Tensor:
        """The scales as they will be stored: rounded to the checkpoint's scale dtype, kept positive."""
        return self.scales.to(self.scale_dtype).float().clamp_min(torch.finfo(self.scale_dtype).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = numerics.fake_quantize_learnable(self.weight, self.scheme, self.stored_scales(), self.zeros, self.g_idx)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_qweight(self) -> QWeight:
        """The integer weight this layer computes with: what convert packs."""
        zeros = None if self.zeros is None else torch.clamp(torch.round(self.zeros), 0, self.scheme.maxq).to(torch.int32)
        return numerics.quantize(self.weight.detach(), self.scheme, self.stored_scales().detach(), zeros, self.g_idx)

    def extra_repr(self) -> str:
        trains = [n for n, p in self.named_parameters() if p.requires_grad]
        return f"in={self.in_features}, out={self.out_features}, bits={self.scheme.bits}, trains={trains}"


class RoundingLinear(nn.Module):
    """A Linear layer for block-wise QAT: the initialisation's integer codes stay as a buffer, and what trains is
    a rounding offset per weight (in grid steps, starting at 0: the codes move only where it crosses ±0.5) and the
    scales (exact gradients: the codes do not follow the scales). Zero points keep the initialisation's integers.
    Forward: `numerics.dequantize_learnable_codes`; `to_qweight` gives exactly the integers it computes with."""

    def __init__(self, linear: nn.Linear, init: QWeight, scheme: Scheme, scale_dtype: torch.dtype, method: MethodConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme, self.scale_dtype = scheme, scale_dtype
        self.weight_dtype = linear.weight.dtype  # what the plain Linear layer after conversion holds
        self.register_buffer("codes", init.q.detach().clone())
        self.register_buffer("zeros", None if init.zeros is None else init.zeros.detach().clone())
        self.register_buffer("g_idx", None if init.g_idx is None else init.g_idx.clone())
        self.offsets = nn.Parameter(torch.zeros(init.q.shape, dtype=torch.float32, device=init.q.device),
                                    requires_grad=method.train_weights)
        # scales train in log space: a learning rate is a relative step, the same for every layer's magnitude
        self.register_buffer("init_scales", init.scales.detach().float().clone())
        self.log_scales = nn.Parameter(torch.zeros_like(self.init_scales), requires_grad=method.learn_scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)

    def stored_scales(self) -> torch.Tensor:
        """The scales as stored: init · exp(log_scales), rounded to the checkpoint's scale dtype (at 0, exactly the
        initialisation's stored scales)."""
        return numerics.stored_scales(self.init_scales * torch.exp(self.log_scales), self.scale_dtype, straight_through=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = numerics.dequantize_learnable_codes(self.codes, self.offsets, self.scheme, self.stored_scales(), self.zeros,
                                                self.g_idx)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_qweight(self) -> QWeight:
        q = numerics.learned_codes(self.codes, self.offsets, self.scheme.maxq).to(self.codes.dtype)
        return QWeight(q, self.stored_scales().detach().clone(), None if self.zeros is None else self.zeros.clone(),
                       self.g_idx)

    def extra_repr(self) -> str:
        trains = [n for n, p in self.named_parameters() if p.requires_grad]
        return f"in={self.in_features}, out={self.out_features}, bits={self.scheme.bits}, trains={trains}"


def prepare(model: nn.Module, qweights: dict[str, QWeight], scheme: Scheme | Mapping[str, Scheme], scale_dtype: torch.dtype,
            method: MethodConfig) -> None:
    """Swap each layer named in `qweights` (nn.Linear) for a FakeQuantLinear started from its QWeight, and freeze
    every other parameter. With GPTQ's result the latent weight is its dequantized weight (what GPTQ leaves in the
    Linear layers), so the fake-quant model starts exactly at the PTQ model. `scheme`: one for all, or each layer's."""
    model.requires_grad_(False)
    for name, qw in qweights.items():
        layer_scheme = scheme[name] if isinstance(scheme, Mapping) else scheme
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name), qw, layer_scheme, scale_dtype, method))


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def convert(model: nn.Module) -> dict[str, QWeight]:
    """{name: QWeight} of every FakeQuantLinear: the integers, scales and zero points the trained model uses."""
    return {name: layer.to_qweight() for name, layer in fake_quant_layers(model).items()}


def init_recipe(recipe: Recipe) -> Recipe:
    """The PTQ recipe whose result QAT starts from (same scheme, clipping and GPTQ options)."""
    return recipe.model_copy(update={"method": recipe.method.model_copy(update={"name": recipe.method.init})})
