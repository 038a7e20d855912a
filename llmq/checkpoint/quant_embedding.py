"""The token embedding as packed n-bit integers (`scheme.embedding`), and the output projection tied to it.

Why it exists: in a small model the embedding dominates the checkpoint (SmolLM2's tied 49k x 576 table is 113 MB
of a 174 MB 4-bit checkpoint). Its weight [vocab, hidden] has exactly the shape and grouping of a Linear layer
with in_features = hidden and out_features = vocab, so `QuantEmbedding` *is* a QuantLinear with that layout: the
same buffers on disk (`<embedding>.qweight / scales / qzeros`), the same kernels when it serves as the tied output
projection (`TiedQuantHead` calls them on the embedding's buffers, so the table is stored and held once). Its own
forward gathers the rows of the token ids and dequantizes only those, with numerics.py.

transformers ties the two by parameter name (lm_head.weight = embed_tokens.weight); neither module has a `weight`
any more, so `untie` removes that tie from the model's bookkeeping — the sharing is this module's job.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .. import numerics
from ..describe import scheme_words
from ..errors import LlmqError
from ..kernels import derived
from ..numerics import QWeight, Scheme
from .quant_linear import QuantLinear

ZEROS_ATTR = "_embedding_zeros"


class QuantEmbedding(QuantLinear):
    """nn.Embedding whose table is stored as a QuantLinear of in_features = embedding_dim, out_features = vocab."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None, device: torch.device | str | None = None):
        super().__init__(embedding_dim, num_embeddings, False, scheme, dtype, device=device)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.serves_head = False  # True when a TiedQuantHead projects through it (kernels.prepare builds its copy then)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of `ids`, dequantized: (q - z) * s in the scales' dtype, as the reference kernel computes them."""
        flat = ids.reshape(-1)
        codes = numerics.unpack(self.qweight[:, flat], self.scheme.bits, self.in_features).t()
        zeros = derived.cached(self, ZEROS_ATTR, _unpacked_zeros).zeros[flat]
        rows = numerics.dequantize(QWeight(codes, self.scales[:, flat].t(), zeros), self.scheme, self.scales.dtype)
        return rows.reshape(*ids.shape, self.in_features)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ tableᵀ: the tied output projection, through this layer's matmul kernel."""
        return super().forward(x)

    def prepare(self) -> None:
        """Build the unpacked zero points up front (kernels.prepare calls it), so a compiled forward finds them."""
        derived.cached(self, ZEROS_ATTR, _unpacked_zeros)

    def extra_repr(self) -> str:
        s = self.scheme
        return f"{self.num_embeddings}, {self.embedding_dim}, {scheme_words(s.bits, s.group_size, s.symmetric, short=True)}"


class _Zeros:
    def __init__(self, key: tuple, zeros: torch.Tensor):
        self.key, self.zeros = key, zeros


def _unpacked_zeros(layer: QuantEmbedding, key: tuple) -> _Zeros:
    """Every row's zero points [vocab, n_groups] (small: one per group, not per weight)."""
    return _Zeros(key, numerics.unpack(layer.qzeros.t(), layer.scheme.bits, layer.out_features).to(torch.int32))


class TiedQuantHead(nn.Module):
    """The output projection of a model whose head is tied to its QuantEmbedding: no tensors of its own."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # a reference, not a submodule: the table is saved once, as the embedding's

    @property
    def in_features(self) -> int:
        return self.embedding.in_features

    @property
    def out_features(self) -> int:
        return self.embedding.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = self.embedding.qweight.device  # a device map may place the head apart from the table it reads
        return self.embedding.project(x.to(device)).to(x.device)

    def extra_repr(self) -> str:
        return "tied to the quantized embedding"


def replace_embedding(model: nn.Module, name: str, scheme: Scheme, dtype: torch.dtype, tied_head: str | None = None,
                      qweight: QWeight | None = None) -> QuantEmbedding:
    """Swap the nn.Embedding `name` for a QuantEmbedding (on its device, meta included), packing `qweight` when
    given; the tied head `tied_head`, if any, becomes a TiedQuantHead reading it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    emb = getattr(parent, child)
    q = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, scheme, dtype, emb.padding_idx, emb.weight.device)
    if qweight is not None:
        q.load_qweight(qweight)
    setattr(parent, child, q)
    if tied_head is not None:
        head_parent, _, head_child = tied_head.rpartition(".")
        setattr(model.get_submodule(head_parent) if head_parent else model, head_child, TiedQuantHead(q))
        q.serves_head = True
    untie(model, [name, *([tied_head] if tied_head else [])])
    return q


def untie(model: nn.Module, names: list[str]) -> None:
    """Drop the ties naming these modules' weights from transformers' bookkeeping (`all_tied_weights_keys`, kept per
    model and submodel with relative names): the tie now lives in TiedQuantHead, and neither has a `weight`.

    `model.tie_weights()` (lm-eval's HFLM calls it on every model it wraps) would otherwise recompute the ties from
    the config and look for `embed_tokens.weight`: on this model instance it keeps the ties the model holds instead."""
    for prefix, module in model.named_modules():
        keys = getattr(module, "all_tied_weights_keys", None)
        if not isinstance(keys, dict):
            continue
        own = {f"{n.removeprefix(prefix + '.') if prefix else n}.weight" for n in names}
        for k in [k for k, v in keys.items() if k in own or v in own]:
            keys.pop(k)
    if callable(getattr(type(model), "tie_weights", None)) and "tie_weights" not in model.__dict__:
        model.__dict__["tie_weights"] = types.MethodType(_kept_ties, model)  # this instance only; the class is untouched
    if callable(getattr(type(model), "resize_token_embeddings", None)):
        model.__dict__["resize_token_embeddings"] = types.MethodType(_no_resize, model)


def _no_resize(model: nn.Module, *args, **kwargs):
    raise LlmqError("this model's token embedding is quantized (llmq QuantEmbedding): its rows cannot be resized; "
                    "add tokens to the full-precision model, then quantize it")


def _kept_ties(model: nn.Module, missing_keys=None, recompute_mapping: bool = True):
    """`tie_weights` of a model with a quantized table: the ties it holds (`all_tied_weights_keys`), never recomputed."""
    return type(model).tie_weights(model, missing_keys=missing_keys, recompute_mapping=False)
