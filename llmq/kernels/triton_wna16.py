"""Triton WnA16 matmul: y = x @ dequant(W)^T + b straight from llmq's packed layout, for CUDA GPUs.

Why it exists: the torch reference dequantizes the whole weight to a dense matrix on every forward, which reads
the packed weight, writes and re-reads a dense copy 4-16x larger, and is far slower than the packed read alone in
token-by-token decoding, where a linear layer is bound by how fast its weight streams from memory. These kernels
unpack the n-bit codes in registers and never materialise the dense weight:

- decode (M <= DECODE_MAX_M rows): a split-K GEMV. The grid is (N blocks) x (K splits) with every program owning
  one [K slice, N block] of the weight, so each packed word is read by exactly one program; the partial sums go
  to an fp32 buffer [splits, M, N] and torch sums them (see `decode_linear`).
- prefill (more rows): a tiled GEMM over (M blocks x N blocks) that dequantizes each [BLOCK_K, BLOCK_N] weight
  tile in registers and feeds it to tl.dot with fp32 accumulation.

Both read the checkpoint tensors as they are (`qweight` [packed K, N], `scales` [G, N], `qzeros` [G, packed N],
`g_idx` [K] or None, numerics.py and the README define them) and handle 2, 3, 4 and 8 bits, any group size
dividing K or one group per channel, act-order `g_idx`, and fp16 / bf16 (or fp32) activations. The result equals
torch_ref.linear up to fp32 summation order and the rounding of the weight to the activation dtype (as the
reference rounds it; the M = 1 GEMV keeps the weight in fp32).

Unpacking: each program loads every packed word of its tile once and fans it out in registers. At 2, 4 and 8
bits a word holds 32 // bits whole codes (shift and mask). At 3 bits 32 codes fill 3 words and codes 10 and 21
straddle two of them: code k is read from w0 = stream[(3k) >> 5] and w1 = the next word, combined as unsigned
and shifted right by (3k) & 31 (see `_fan_out3` for the shift-by-32 case).

What it deliberately does not do: no repacking into a kernel-friendly layout at load time (the on-disk layout is
the one read here, so a layer needs no second copy and no conversion step), no activation quantization, no
nf4 / fp4 formats, no backward pass, no CUDA graphs or persistent kernels, and no AMD-specific tuning. Without
triton it imports fine and `supported` says False, so kernels.select falls back to the torch reference.

Under the Triton interpreter (TRITON_INTERPRET=1, how the tests run it on CPU) the kernels run with one fixed
config of large blocks and no autotuning, and bf16 activations multiply in fp32 and store fp32 outputs that torch
rounds to bf16: the interpreter's tl.dot is wrong for bf16 and its fp32 -> bf16 cast truncates.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..numerics import PEER_BITS, Scheme

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton (CPU-only installs): supported() is False and nothing below is defined
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton.jit itself does at decoration time
# One fixed config instead of autotuning: always under the interpreter; on a GPU with LLMQ_TRITON_AUTOTUNE=0
# (tests, where tuning every shape would cost minutes and each shape runs once).
FIXED = INTERPRET or os.environ.get("LLMQ_TRITON_AUTOTUNE") == "0"
DECODE_MAX_M = 16  # up to this many rows run the split-K GEMV, more run the tiled GEMM


def supported(scheme: Scheme, device: torch.device | str) -> bool:
    """True when these kernels can run `scheme` on `device`: triton imports, the device is CUDA (or the
    interpreter is on), and the weights are plain n-bit integers of a width the kernels unpack."""
    if triton is None or scheme.format != "int" or scheme.bits not in PEER_BITS:  # 5 / 6 bits: the reference kernel
        return False
    return torch.device(device).type == "cuda" or INTERPRET


if triton is not None:
    # The kernels call only tl builtins, not the @jit helpers of triton.language.standard (tl.cdiv, tl.sum,
    # tl.zeros): those are interpretable only when triton itself was imported with TRITON_INTERPRET=1, and in a
    # test session llmq (and so triton) may be imported before the interpreter is switched on. Sums use
    # tl.reduce with triton's own sum combiner, which the interpreter recognises and runs as one numpy sum (a
    # combiner of our own would be correct but is run element by element in Python there).

    @triton.jit
    def _add(a, b):
        return a + b

    _SUM = getattr(tl.standard, "_sum_combine", _add)

    @triton.jit
    def _fan_out(words, BITS: tl.constexpr, AXIS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """2, 4 or 8 bits: int32 words [A, B] -> codes [ROWS, COLS] int32, unpacked along AXIS (32 // BITS codes
        per word, low bits first, so the codes of word w are numbers w * 32 // BITS + i, i = 0, 1, ...)."""
        PACK: tl.constexpr = 32 // BITS
        shifts = tl.arange(0, PACK) * BITS
        # an arithmetic shift is fine: shift + BITS <= 32, so the mask keeps only genuine bits of the word
        if AXIS == 0:
            codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        else:
            codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(codes, (ROWS, COLS))

    @triton.jit
    def _fan_out3(p0, p1, p2, AXIS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """3 bits: every 32 codes fill 3 words; p0, p1, p2 [A, B] hold word 0, 1, 2 of each such run.
        Returns codes [ROWS, COLS] int32, unpacked along AXIS.

        Code i of a run starts at bit 3i: in word w0 = (3i) >> 5 at shift s = (3i) & 31, continuing into the
        next word w1 when s > 29 (codes 10 and 21). The words are combined as unsigned: (w0 >> s) | (w1 << (32 - s)),
        but a shift by 32 is undefined (s = 0), so the second part is computed as (w1 << 1) << (31 - s), which
        gives 0 for s = 0 with both shifts in range."""
        i = tl.arange(0, 32)
        word = (i * 3) >> 5
        shift = ((i * 3) & 31).to(tl.uint32)
        a = p0.to(tl.uint32, bitcast=True)
        b = p1.to(tl.uint32, bitcast=True)
        c = p2.to(tl.uint32, bitcast=True)
        if AXIS == 0:
            a, b, c = a[:, None, :], b[:, None, :], c[:, None, :]
            word, shift = word[None, :, None], shift[None, :, None]
        else:
            a, b, c = a[:, :, None], b[:, :, None], c[:, :, None]
            word, shift = word[None, None, :], shift[None, None, :]
        w0 = tl.where(word == 0, a, tl.where(word == 1, b, c))
        w1 = tl.where(word == 0, b, c)  # the next word (unused, but harmless, for the codes of word 2)
        codes = ((w0 >> shift) | ((w1 << 1) << (31 - shift))) & 7
        return tl.reshape(codes.to(tl.int32), (ROWS, COLS))

    @triton.jit
    def _weight_codes(qw_ptr, k0, offs_n, n_mask, KW, stride_qk, stride_qn,
                      BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Codes q[k0:k0+BLOCK_K, offs_n] [BLOCK_K, BLOCK_N] from qweight (packed along K): every word of the
        tile is loaded once and fanned out in registers. k0 is a multiple of BLOCK_K, itself a multiple of 32."""
        cols = qw_ptr + offs_n[None, :] * stride_qn
        if BITS == 3:
            run = k0 // 32 + tl.arange(0, BLOCK_K // 32)  # runs of 32 codes = 3 words each
            w = run[:, None] * 3
            p0 = tl.load(cols + w * stride_qk, mask=(w < KW) & n_mask[None, :], other=0)
            p1 = tl.load(cols + (w + 1) * stride_qk, mask=(w + 1 < KW) & n_mask[None, :], other=0)
            p2 = tl.load(cols + (w + 2) * stride_qk, mask=(w + 2 < KW) & n_mask[None, :], other=0)
            return _fan_out3(p0, p1, p2, 0, BLOCK_K, BLOCK_N)
        else:
            PACK: tl.constexpr = 32 // BITS
            w = (k0 // PACK + tl.arange(0, BLOCK_K // PACK))[:, None]
            words = tl.load(cols + w * stride_qk, mask=(w < KW) & n_mask[None, :], other=0)
            return _fan_out(words, BITS, 0, BLOCK_K, BLOCK_N)

    @triton.jit
    def _gemv_words(x_ptr, qw_ptr, k0, K, KW, offs_n, n_mask, z, stride_xk, stride_qk, stride_qn,
                    BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """sum_k x_k (q_k - z) over k0:k0+BLOCK_K for 2/4/8-bit codes, [1, BLOCK_N] fp32: the codes stay in their
        [words, codes per word, columns] shape and x is loaded in the same shape, so no register reshuffle (tl.reshape)
        sits between the load and the multiply-add."""
        PACK: tl.constexpr = 32 // BITS
        W: tl.constexpr = BLOCK_K // PACK
        wrow = k0 // PACK + tl.arange(0, W)
        words = tl.load(qw_ptr + wrow[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(wrow[:, None] < KW) & n_mask[None, :], other=0)
        shifts = tl.arange(0, PACK) * BITS
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [W, PACK, BLOCK_N]
        kk = k0 + tl.arange(0, W)[:, None] * PACK + tl.arange(0, PACK)[None, :]  # [W, PACK]
        x = tl.load(x_ptr + kk * stride_xk, mask=kk < K, other=0).to(tl.float32)
        prod = x[:, :, None] * (codes - z[:, None, :]).to(tl.float32)
        return tl.reduce(tl.reduce(prod, 1, _SUM), 0, _SUM)[None, :]

    @triton.jit
    def _channel_params(s_ptr, z_ptr, n0, offs_n, n_mask, ZW, stride_sg, stride_sn, stride_zg, stride_zw,
                        BITS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_GROUP: tl.constexpr):
        """With one group per channel (SINGLE_GROUP): its scales and zero points [1, BLOCK_N], loaded once for the
        whole K loop; otherwise placeholders (the K loop loads each group's own)."""
        if SINGLE_GROUP:
            g0 = tl.arange(0, 1)
            s_one, z_one = _group_params(s_ptr, z_ptr, g0, g0 == 0, n0, offs_n, n_mask, ZW,
                                         stride_sg, stride_sn, stride_zg, stride_zw, BITS, 1, BLOCK_N)
        else:
            s_one, z_one = 0.0, 0
        return s_one, z_one

    @triton.jit
    def _group_params(s_ptr, z_ptr, g, g_mask, n0, offs_n, n_mask, ZW, stride_sg, stride_sn, stride_zg, stride_zw,
                      BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Scales (fp32) and zero points (int32) [ROWS, BLOCK_N] of groups g [ROWS] for columns offs_n, which start at
        n0, a multiple of BLOCK_N. Zero points are packed along N, so their words are fanned out like the codes."""
        mask = g_mask[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0).to(tl.float32)
        rows = z_ptr + g[:, None] * stride_zg
        if BITS == 3:
            w = ((n0 // 32 + tl.arange(0, BLOCK_N // 32)) * 3)[None, :]
            p0 = tl.load(rows + w * stride_zw, mask=g_mask[:, None] & (w < ZW), other=0)
            p1 = tl.load(rows + (w + 1) * stride_zw, mask=g_mask[:, None] & (w + 1 < ZW), other=0)
            p2 = tl.load(rows + (w + 2) * stride_zw, mask=g_mask[:, None] & (w + 2 < ZW), other=0)
            z = _fan_out3(p0, p1, p2, 1, ROWS, BLOCK_N)
        else:
            PACK: tl.constexpr = 32 // BITS
            w = (n0 // PACK + tl.arange(0, BLOCK_N // PACK))[None, :]
            words = tl.load(rows + w * stride_zw, mask=g_mask[:, None] & (w < ZW), other=0)
            z = _fan_out(words, BITS, 1, ROWS, BLOCK_N)
        return s, z

    @triton.jit
    def _weight_tile(
        qw_ptr, s_ptr, z_ptr, g_ptr, k0, n0, offs_n, n_mask, K, KW, ZW,
        stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zw, s_one, z_one,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SINGLE_GROUP: tl.constexpr, HAS_G_IDX: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """The dequantized weight tile w[offs_n, k0:k0+BLOCK_K], transposed to [BLOCK_K, BLOCK_N], in fp32.

        Rows k >= K come out finite (codes are padding or masked); callers zero the matching activations.
        """
        q = _weight_codes(qw_ptr, k0, offs_n, n_mask, KW, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
        if SINGLE_GROUP:  # one group per channel: the caller loaded it before its K loop
            w = (q - z_one).to(tl.float32) * s_one
        elif (not HAS_G_IDX) and (GROUP_SIZE % BLOCK_K == 0):  # the tile lies in one group: one row
            g = k0 // GROUP_SIZE + tl.arange(0, 1)
            s, z = _group_params(s_ptr, z_ptr, g, g < K // GROUP_SIZE, n0, offs_n, n_mask, ZW,
                                 stride_sg, stride_sn, stride_zg, stride_zw, BITS, 1, BLOCK_N)
            w = (q - z).to(tl.float32) * s
        elif (not HAS_G_IDX) and (BLOCK_K % GROUP_SIZE == 0):  # the tile spans NG whole groups: NG rows
            NG: tl.constexpr = BLOCK_K // GROUP_SIZE
            g = k0 // GROUP_SIZE + tl.arange(0, NG)
            s, z = _group_params(s_ptr, z_ptr, g, g < K // GROUP_SIZE, n0, offs_n, n_mask, ZW,
                                 stride_sg, stride_sn, stride_zg, stride_zw, BITS, NG, BLOCK_N)
            q3 = tl.reshape(q, (NG, GROUP_SIZE, BLOCK_N))
            w = tl.reshape((q3 - z[:, None, :]).to(tl.float32) * s[:, None, :], (BLOCK_K, BLOCK_N))
        else:  # act-order g_idx (or a group size that does not tile): each row gathers its group's parameters
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            if HAS_G_IDX:
                g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            else:
                g = offs_k // GROUP_SIZE
            s, z = _group_params(s_ptr, z_ptr, g, k_mask, n0, offs_n, n_mask, ZW,
                                 stride_sg, stride_sn, stride_zg, stride_zw, BITS, BLOCK_K, BLOCK_N)
            w = (q - z).to(tl.float32) * s
        return w

    @triton.jit
    def _mma(acc, a, w, FP32_DOT: tl.constexpr):
        """acc += a @ w for the fp32 weight tile w: rounded to a's dtype (what the reference multiplies by) for
        the tensor cores, or kept in fp32 for fp32 activations (exact, not tf32) and for bf16 under the
        interpreter, whose tl.dot and fp32 -> bf16 casts are wrong (the cast truncates)."""
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        return acc

    def _tuned(configs, key, prune=None):
        """triton.autotune on a GPU; under the interpreter the caller passes one fixed config instead."""
        if FIXED:
            return lambda fn: fn
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)

    # Decode: a few rows, so each program holds a [BLOCK_N] (GEMV, M == 1) or [16, BLOCK_N] accumulator and the
    # cost is streaming the weight. BLOCK_K / BLOCK_N trade per-program work against enough programs in flight.
    _DECODE_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 4), (64, 256, 4, 3), (256, 64, 8, 3), (128, 256, 8, 3),
            (64, 64, 4, 2),  # small shared-memory footprint: fits GPUs with ~100 KB per SM in every variant
        ]
    ]
    _DECODE_INTERPRET = {"BLOCK_N": 128, "BLOCK_K": 128}

    # Prefill: tensor-core tiles. Small BLOCK_M for short prompts; configs with BLOCK_M far above M are pruned.
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
            (32, 64, 64, 4, 2),  # small shared-memory footprint, as above
        ]
    ]
    _GEMM_INTERPRET = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}

    def _prune_gemm(configs, named_args, **kwargs):
        """Drop tiles taller than the M bucket (they compute padding); keep at least the smallest."""
        bucket = named_args["M_BUCKET"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= bucket]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]

    _KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_G_IDX"]

    @_tuned(_DECODE_CONFIGS, _KEY)
    @triton.jit
    def _decode_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr,
        M, N, K, KW, ZW, SPLIT_K, M_BUCKET,
        stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zw,
        stride_os, stride_om, stride_on,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SINGLE_GROUP: tl.constexpr, HAS_G_IDX: tl.constexpr,
        HAS_BIAS: tl.constexpr, FINAL: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Program (n, s): columns [n*BLOCK_N, ...) over the s-th of SPLIT_K equal runs of K tiles.

        FINAL (SPLIT_K == 1): adds the bias and stores y in the output dtype; otherwise stores fp32 partial
        sums at out[s] for the host to reduce.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        s_one, z_one = _channel_params(s_ptr, z_ptr, n0, offs_n, n_mask, ZW, stride_sg, stride_sn, stride_zg, stride_zw,
                                       BITS, BLOCK_N, SINGLE_GROUP)
        n_tiles = (K + BLOCK_K - 1) // BLOCK_K
        per_split = (n_tiles + SPLIT_K - 1) // SPLIT_K
        t_end = tl.minimum((pid_s + 1) * per_split, n_tiles)  # trailing splits may own no tile: they store zeros
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        # GEMV over whole groups: sum_k x_k (q_k - z) s = s sum_k x_k (q_k - z) within a group, so the scale is
        # applied once per column and tile, not per weight; q - z stays an exact integer, as in the reference.
        PER_GROUP: tl.constexpr = (BLOCK_M == 1) and (SINGLE_GROUP or ((not HAS_G_IDX) and (GROUP_SIZE % BLOCK_K == 0)))
        for t in range(pid_s * per_split, t_end):
            k0 = t * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if PER_GROUP:
                if SINGLE_GROUP:
                    s, z = s_one, z_one
                else:
                    g = k0 // GROUP_SIZE + tl.arange(0, 1)
                    s, z = _group_params(s_ptr, z_ptr, g, g < K // GROUP_SIZE, n0, offs_n, n_mask, ZW,
                                         stride_sg, stride_sn, stride_zg, stride_zw, BITS, 1, BLOCK_N)
                if BITS == 3:
                    q = _weight_codes(qw_ptr, k0, offs_n, n_mask, KW, stride_qk, stride_qn, BITS, BLOCK_K, BLOCK_N)
                    x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0).to(tl.float32)
                    acc += s * tl.reduce(x[:, None] * (q - z).to(tl.float32), 0, _SUM)[None, :]
                else:
                    acc += s * _gemv_words(x_ptr, qw_ptr, k0, K, KW, offs_n, n_mask, z, stride_xk, stride_qk, stride_qn,
                                           BITS, BLOCK_K, BLOCK_N)
            elif BLOCK_M == 1:  # GEMV, groups that do not tile: dequantize, fp32 multiply-add and a column sum
                w = _weight_tile(
                    qw_ptr, s_ptr, z_ptr, g_ptr, k0, n0, offs_n, n_mask, K, KW, ZW,
                    stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zw, s_one, z_one,
                    BITS, GROUP_SIZE, SINGLE_GROUP, HAS_G_IDX, BLOCK_K, BLOCK_N,
                )
                x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0).to(tl.float32)
                acc += tl.reduce(x[:, None] * w, 0, _SUM)[None, :]
            else:
                w = _weight_tile(
                    qw_ptr, s_ptr, z_ptr, g_ptr, k0, n0, offs_n, n_mask, K, KW, ZW,
                    stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zw, s_one, z_one,
                    BITS, GROUP_SIZE, SINGLE_GROUP, HAS_G_IDX, BLOCK_K, BLOCK_N,
                )
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k[None, :] < K), other=0,
                )
                acc = _mma(acc, x, w, FP32_DOT)
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = m_mask[:, None] & n_mask[None, :]
        if FINAL:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out, acc, mask=mask)

    @_tuned(_GEMM_CONFIGS, _KEY, _prune_gemm)
    @triton.jit
    def _gemm_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr,
        M, N, K, KW, ZW, M_BUCKET,
        stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zw,
        stride_om, stride_on,
        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SINGLE_GROUP: tl.constexpr, HAS_G_IDX: tl.constexpr,
        HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] output tile per program, over all of K; bias and the output cast fused."""
        pid = tl.program_id(0)
        num_m = (M + BLOCK_M - 1) // BLOCK_M
        num_n = (N + BLOCK_N - 1) // BLOCK_N
        # Grouped order: GROUP_M row blocks sweep the same column blocks together, so a weight tile is still in
        # L2 when the next row block asks for it.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        s_one, z_one = _channel_params(s_ptr, z_ptr, n0, offs_n, n_mask, ZW, stride_sg, stride_sn, stride_zg, stride_zw,
                                       BITS, BLOCK_N, SINGLE_GROUP)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _weight_tile(
                qw_ptr, s_ptr, z_ptr, g_ptr, k0, n0, offs_n, n_mask, K, KW, ZW,
                stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zw, s_one, z_one,
                BITS, GROUP_SIZE, SINGLE_GROUP, HAS_G_IDX, BLOCK_K, BLOCK_N,
            )
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & (offs_k[None, :] < K), other=0,
            )
            acc = _mma(acc, x, w, FP32_DOT)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------- host side


def _m_bucket(m: int) -> int:
    """Autotuning key for the row count: powers of two, so a new prompt length rarely triggers a new tuning."""
    return min(triton.next_power_of_2(m), 4096)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_split_k(n: int, k: int, device: torch.device) -> int:
    """K splits for the decode grid: about eight programs per SM (measured on an H100: 4-16 splits beat fewer on the
    issue's shapes; benchmarks/results/gpu_h100/splitk.json), with at least 512
    input columns per split so each program streams a worthwhile run of weight. 1 under the interpreter, where
    parallelism buys nothing."""
    if INTERPRET or device.type != "cuda":
        return 1
    programs = triton.cdiv(n, 128)  # nominal: the autotuned BLOCK_N is 64-256
    want = max(1, 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) // programs)
    return max(1, min(want, k // 512, 16))


def _layer_args(x2: torch.Tensor, layer) -> tuple[list, list, list, dict]:
    """(pointers, sizes, strides, constexprs) shared by both kernels."""
    scheme, K, N = layer.scheme, layer.in_features, layer.out_features
    qweight, scales, qzeros = layer.qweight, layer.scales, layer.qzeros
    g_idx, bias = getattr(layer, "g_idx", None), layer.bias
    single = scales.shape[0] == 1  # per-channel (or one group): any g_idx can only say group 0
    dummy = qweight  # stands in for absent optional pointers; never dereferenced (the constexpr flags are False)
    args = [
        x2, qweight, scales, qzeros, dummy if g_idx is None else g_idx, dummy if bias is None else bias,
    ]
    sizes = [x2.shape[0], N, K, qweight.shape[0], qzeros.shape[1]]
    strides = [*x2.stride(), *qweight.stride(), *scales.stride(), *qzeros.stride()]
    meta = {
        "BITS": scheme.bits,
        "GROUP_SIZE": 0 if single else scheme.group_size_for(K),
        "SINGLE_GROUP": single,
        "HAS_G_IDX": g_idx is not None and not single,
        "HAS_BIAS": bias is not None,
        "FP32_DOT": x2.dtype == torch.float32 or _interpreted_bf16(x2),
    }
    return args, sizes, strides, meta


def _interpreted_bf16(x: torch.Tensor) -> bool:
    """bf16 under the interpreter, whose tl.dot gets bf16 wrong and whose fp32 -> bf16 cast truncates instead of
    rounding to nearest: such calls multiply in fp32 and store fp32 that torch rounds to bf16."""
    return INTERPRET and x.dtype == torch.bfloat16


def _on(device: torch.device):
    """Launch on the tensors' GPU, not the current one (layers of one model can sit on several GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check(x: torch.Tensor, layer) -> None:
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")


def decode_linear(x: torch.Tensor, layer, split_k: int | None = None) -> torch.Tensor:
    """The split-K GEMV path for any M (meant for M <= DECODE_MAX_M); `split_k` overrides the heuristic."""
    _check(x, layer)
    x2 = x.reshape(-1, layer.in_features)
    M, N, K = x2.shape[0], layer.out_features, layer.in_features
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if M > DECODE_MAX_M:  # the accumulator holds at most 16 rows: run 16 at a time
        return torch.cat([decode_linear(c, layer, split_k) for c in x2.split(DECODE_MAX_M)]).reshape(*x.shape[:-1], N)
    split = split_k or _default_split_k(N, K, x2.device)
    args, sizes, strides, meta = _layer_args(x2, layer)
    # Deterministic two-pass split-K instead of atomic adds into one fp32 output: atomics make the summation
    # order (and so the last bit of every output) vary run to run, and llmq compares evaluations of quantized
    # models run against run. The partial buffer is splits * M * N fp32, small next to the weight read (at
    # M = 1, N = K = 4096, 4 bits, 8 splits: 128 KiB against 8 MiB), and one split writes y directly.
    final = split == 1
    out_dtype = x2.dtype if final and not _interpreted_bf16(x2) else torch.float32
    out = torch.empty((1 if final else split, M, N), device=x2.device, dtype=out_dtype)
    block_m = 1 if M == 1 else DECODE_MAX_M  # the GEMV, or 16 rows padded to one tensor-core tile
    meta.update(FINAL=final, BLOCK_M=block_m)
    if FIXED:
        meta.update(_DECODE_INTERPRET)

    def grid(cfg):
        return (triton.cdiv(N, cfg["BLOCK_N"]), split)

    with _on(x2.device):
        _decode_kernel[grid](*args, out, *sizes, split, block_m, *strides, *out.stride(), **meta)
    if final:
        y = out[0].to(x2.dtype)
    else:
        y = out.sum(0)
        if layer.bias is not None:
            y += layer.bias.float()
        y = y.to(x2.dtype)
    return y.reshape(*x.shape[:-1], N)


def gemm_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """The tiled GEMM path for any M (meant for M > DECODE_MAX_M)."""
    _check(x, layer)
    x2 = x.reshape(-1, layer.in_features)
    M, N = x2.shape[0], layer.out_features
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    args, sizes, strides, meta = _layer_args(x2, layer)
    out = torch.empty((M, N), device=x2.device, dtype=torch.float32 if _interpreted_bf16(x2) else x2.dtype)
    if FIXED:
        meta.update(_GEMM_INTERPRET)

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    with _on(x2.device):
        _gemm_kernel[grid](*args, out, *sizes, _m_bucket(M), *strides, *out.stride(), **meta)
    return out.to(x2.dtype).reshape(*x.shape[:-1], N)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y = x @ W^T + b for a QuantLinear `layer`, x [..., K] on the layer's device; the same contract as
    torch_ref.linear. Decode-sized inputs (at most DECODE_MAX_M rows) take the split-K GEMV, larger the GEMM."""
    rows = x.numel() // max(x.shape[-1], 1)
    return decode_linear(x, layer) if rows <= DECODE_MAX_M else gemm_linear(x, layer)
