"""GPTQ (Frantar et al., 2022): quantize a weight one column at a time and push each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The layer-level algorithm (`gptq_quantize`) follows the paper and the reference implementation's structure:
H = 2/n Σ XᵀX (fp32, running mean), dead inputs zeroed, damping grown until Cholesky succeeds,
Hinv = chol(cholesky_inverse(chol(H)))ᵀ, lazy batch updates in blocks of columns, optional act_order and
static_groups, and group qparams from the current (error-updated) weights with the clipping search of
`rtn.layer_qparams`. The block-level driver (`gptq_block`) calibrates a decoder block's Linear layers cluster
by cluster (true-sequential: each cluster sees the outputs of the already-quantized earlier ones).

What this file does not do: walk the model, load weights or write files (quantization/blockwise.py), nor pick data
(calibration/). Qparams and rounding come from numerics.py, as for every other method.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch import nn

from .. import numerics
from ..errors import LlmqError
from ..numerics import QWeight, Scheme
from ..recipe import MethodConfig
from .job import BlockJob
from .rtn import layer_qparams, quantize_weight

MAX_DAMP = 10.0  # relative to mean(diag H); past this the Hessian is not worth trusting


class Hessian:
    """Running H = 2/n Σ xᵀx over the rows x of every input batch seen, in fp32."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m, k = x.shape
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        if k < 512:
            self.H.addmm_(x.t(), x)
            return
        # H is symmetric: compute the two diagonal blocks and one off-diagonal block (3/4 of the work)
        a, b = slice(0, k // 2), slice(k // 2, k)
        self.H[a, a].addmm_(x[:, a].t(), x[:, a])
        self.H[b, b].addmm_(x[:, b].t(), x[:, b])
        off = x[:, a].t() @ x[:, b]
        self.H[a, b] += off
        self.H[b, a] += off.t()


def inverse_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ and the damping λ used: `damp` first, doubled (from at
    least 1e-4) until both factorizations succeed."""
    mean_diag = H.diagonal().mean()
    lam = damp
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(lam * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, lam
        if lam >= MAX_DAMP:
            raise LlmqError(f"GPTQ: the Hessian is not positive definite even with damping {lam:g} x mean(diag H)")
        lam = min(max(2 * lam, 1e-4), MAX_DAMP)


def gptq_quantize(
    w: torch.Tensor, H: torch.Tensor, scheme: Scheme, method: MethodConfig, scale_dtype: torch.dtype = torch.float32
) -> tuple[QWeight, float, float]:
    """GPTQ one weight [out, in] against the Hessian H [in, in] of its inputs.

    Returns (QWeight, loss, damping used); loss = Σ (w - ŵ)² / (2·Hinv_ii²) summed over the columns, the
    quantity GPTQ minimizes greedily (the layer output error the Hessian predicts).
    """
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    out, K = W.shape
    gs = scheme.group_size_for(K)
    grouped = scheme.group_size is not None
    col_scheme = replace(scheme, group_size=None)  # qparams of one group slice: one "group" per row

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    hdiag = H.diagonal().clone() if method.clip_weights == "hessian" else None  # weights of the clipping search
    static = None
    if grouped and method.static_groups:  # qparams from the original weights, in the original column order
        static = layer_qparams(W, scheme, method, scale_dtype, hdiag)
    perm = None
    if method.act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        hdiag = None if hdiag is None else hdiag[perm]
    Hinv, damp = inverse_factor(H, method.damp)
    del H

    if static is not None:  # per column (in processing order): its group's scale and zero point
        static_z = numerics.zero_values(static[1], static[0], scheme)
        col_group = ((perm if perm is not None else torch.arange(K)) // gs).tolist()
    if not grouped:  # per-channel: one set of qparams per row, from the whole (permuted) row
        channel_scales, channel_zeros = layer_qparams(W, col_scheme, method, scale_dtype, hdiag)
        s, z = channel_scales[:, 0], numerics.zero_values(channel_zeros, channel_scales, scheme)[:, 0]
    Q = torch.zeros(out, K, dtype=torch.uint8, device=W.device)
    group_scales, group_zeros = [], []
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    # lazy-batch width: a multiple of the group size, so a group never straddles two batches
    bs = max(method.block_size // gs, 1) * gs if grouped else method.block_size
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = col_group[col]
                s, z = static[0][:, g], static_z[:, g]
            elif grouped and col % gs == 0:  # qparams of the next group from its current, error-updated weights
                c = None if hdiag is None else hdiag[col : col + gs]
                gs_s, gs_z = layer_qparams(W1[:, i : i + gs], col_scheme, method, scale_dtype, c)
                group_scales.append(gs_s[:, 0])
                group_zeros.append(None if gs_z is None else gs_z[:, 0])
                s, z = gs_s[:, 0], numerics.zero_values(gs_z, gs_s, scheme)[:, 0]
            wcol = W1[:, i]
            q = numerics.to_codes(wcol, s, z, scheme)
            err = (wcol - numerics.from_codes(q, s, z, scheme)) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # the error, spread over the block's remaining columns
            Q1[:, i] = q
            Err1[:, i] = err
        Q[:, i1:i2] = Q1.to(torch.uint8)
        loss += Err1.double().pow(2).sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = None
    if static is not None:
        scales, zeros = static
    elif grouped:
        scales = torch.stack(group_scales, dim=1)
        zeros = None if scheme.symmetric or scheme.codebook is not None else torch.stack(group_zeros, dim=1)
        if perm is not None:  # groups were formed in act order: column perm[j] belongs to group j // gs
            g_idx = torch.empty(K, dtype=torch.int32, device=W.device)
            g_idx[perm] = torch.arange(K, dtype=torch.int32, device=W.device) // gs
    else:
        scales, zeros = channel_scales, channel_zeros
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QWeight(Q, scales, zeros, g_idx), float(loss), damp


def gptq_block(block: nn.Module, names: list[str], job: BlockJob) -> dict[str, QWeight]:
    """GPTQ the named Linear layers of one decoder block on the calibration activations `job.inputs`.

    Cluster by cluster (layers sharing an input share one Hessian): feed the block until the cluster's layers
    have seen their inputs, quantize them, and write the dequantized weights back into the block so that later
    clusters (true_sequential) and the next block see the quantized layers' outputs. Layers the forward pass
    never reaches get RTN (there is no data to calibrate them on) and are logged as such.
    """
    if job.inputs is None or job.clusters is None:
        raise LlmqError("GPTQ needs calibration activations for every block")
    wanted = set(names)
    clusters = [[n for n in c if n in wanted] for c in job.clusters]
    clusters = [c for c in clusters if c]
    passes = clusters if job.config.true_sequential else [[n for c in clusters for n in c]]
    passes = [[c for c in clusters if c[0] in p] for p in passes]
    out: dict[str, QWeight] = {}
    for pass_clusters in passes:
        t0 = time.perf_counter()
        hessians = [Hessian(block.get_submodule(c[0]).in_features, block.get_submodule(c[0]).weight.device) for c in pass_clusters]
        taps = {block.get_submodule(c[0]): h.add for c, h in zip(pass_clusters, hessians)}
        last = block.get_submodule(pass_clusters[-1][-1])
        taps.setdefault(last, lambda x: None)
        job.inputs.feed(block, taps, stop_after=last)
        calib_s = (time.perf_counter() - t0) / sum(len(c) for c in pass_clusters)
        for cluster, hessian in zip(pass_clusters, hessians):
            for name in cluster:
                t = time.perf_counter()
                layer = block.get_submodule(name)
                scheme = job.scheme_for(name)
                qw, loss, damp = gptq_quantize(layer.weight.data, hessian.H, scheme, job.config, job.scale_dtype)
                layer.weight.data = numerics.dequantize(qw, scheme, dtype=layer.weight.dtype)
                out[name] = qw
                job.log({"layer": name, "method": "gptq", "loss": loss, "damp": damp, "seconds": time.perf_counter() - t + calib_s})
            del hessian
    for name in names:
        if name not in out:
            t = time.perf_counter()
            layer = block.get_submodule(name)
            scheme = job.scheme_for(name)
            out[name] = quantize_weight(layer.weight.data, scheme, job.config, job.scale_dtype)
            layer.weight.data = numerics.dequantize(out[name], scheme, dtype=layer.weight.dtype)
            job.log({"layer": name, "method": "rtn (not reached by calibration)", "seconds": time.perf_counter() - t})
    return out
