"""
Inference kernels for ButterflyQuant models: the online transform T x and the packed low-bit matmul
y = x @ dequant(Wq)^T. Each Triton kernel sits beside its PyTorch reference; `butterfly()` and `qmatmul()`
dispatch in one place (rules in the dispatch section): Triton on CUDA tensors, the references everywhere else.

Default paths (each compiles for sm_90 and sm_80 without spills: `--compile`, checked by test_all.py):
  T x      block-matmul butterfly: m = 16..256 holds its blocks for a program's life, m = 512..16384 (fp16,
           bf16; n = 4096) streams them from L2 per tile of 32 rows; persistent loops over rows. fp32 at
           m >= 512: the register-shuffle butterfly (one stage at a time). m > 16384, and fp32 with a 64-segment
           Q (n = 11008), run the reference. Reasons in butterfly() and _transform_supported().
  matmul   decode (<= 16 rows): slab GEMV (2/4/8 bits, tile-aligned widths) or split-K tile GEMV; the fused
           dequant-GEMM up to PREFILL_ROWS; beyond, dequantize once and cuBLAS.
Experimental (off by default, last section): the Triton backward of the transform, and the decode GEMV with the
input transform fused in (BQ_FUSE_ROWS).

Packed weights (see butterflyquant.pack): one little-endian bit stream per matrix, row after row, `bits` bits
per value in int32 words; fp16 scale and zero per (row, group of g input columns); w = s * (q - z).

    python kernels.py --compile   # compile every configuration the dispatch can choose for sm_90 and sm_80
    python kernels.py --bench     # static facts, bytes moved and their roofline time; timings on a GPU
"""
import argparse
import concurrent.futures
import contextlib
import functools
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import butterflyquant as bq

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:     # the references still run
    HAVE_TRITON = False

_RECORD = None      # a list while dispatch_launches() records launches instead of running them


def use_triton(x):
    """Kernels on CUDA tensors (and on meta tensors while recording). Tests call the Triton entry points
    directly on CPU under TRITON_INTERPRET=1."""
    return HAVE_TRITON and (x.is_cuda or _RECORD is not None)


def _launch(kernel, grid, *args, **meta):
    """Every Triton launch goes through here, so that dispatch_launches() can list them with no GPU."""
    if _RECORD is not None:
        _RECORD.append((kernel, args, meta))
    else:
        kernel[grid](*args, **meta)


# -----------------------------------------------------------------------------
# references

def transform_ref(x, cos, sin, Q=None, transpose=False):
    """T x for T = Q (x) B(m): x (..., K*m), cos/sin (log2 m, m/2), Q (K, K) or None (K = 1)."""
    K = 1 if Q is None else Q.shape[0]
    m = x.shape[-1] // K
    y = x.reshape(*x.shape[:-1], K, m)
    if transpose:
        if Q is not None:
            y = Q.T.to(y.dtype) @ y
        return bq.butterfly_apply(y, cos.to(y.dtype), sin.to(y.dtype), transpose=True).reshape(x.shape)
    y = bq.butterfly_apply(y, cos.to(y.dtype), sin.to(y.dtype))
    if Q is not None:
        y = Q.to(y.dtype) @ y
    return y.reshape(x.shape)


def unpack_rows(words, bits, out_features, in_features):
    """Packed stream -> integer matrix (out, in). Fast path where every row starts on a word boundary."""
    if 32 % bits == 0 and (in_features * bits) % 32 == 0:
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
        w = words[: out_features * in_features // per].view(-1, 1)
        q = (w >> shifts) & (2 ** bits - 1)
        return q.view(out_features, in_features)
    return bq.unpack(words, bits, (out_features, in_features))


def dequant_ref(words, scales, zeros, bits, group, out_features, in_features, dtype=torch.float32):
    q = unpack_rows(words, bits, out_features, in_features)
    s = bq.expand_groups(scales.to(dtype), in_features, group)
    z = bq.expand_groups(zeros.to(dtype), in_features, group)
    return s * (q.to(dtype) - z)


def qmatmul_ref(x, words, scales, zeros, bits, group, out_features, in_features):
    return x @ dequant_ref(words, scales, zeros, bits, group, out_features, in_features, x.dtype).T



# -----------------------------------------------------------------------------
# Triton: the shuffle kernel. A program reads its rows once, Q mixes their K segments (tl.dot), all log2(m)
# butterfly stages run in registers (one split / rotate / join per stage), and the rows are written once.
# Q (x) B = (I (x) B)(Q (x) I).

if HAVE_TRITON:
    @triton.jit
    def _stage(y, cos_ptr, sin_ptr, i: tl.constexpr, KP: tl.constexpr, M: tl.constexpr, TRANSPOSE: tl.constexpr):
        """Stage i on y (KP, M): rotate every pair (j, j + 2^i) by theta[i, pair] (by -theta if TRANSPOSE)."""
        S: tl.constexpr = 1 << i
        NB: tl.constexpr = M // (2 * S)
        offs = tl.arange(0, NB)[:, None] * S + tl.arange(0, S)[None, :]          # pair index (NB, S)
        c = tl.load(cos_ptr + i * (M // 2) + offs)
        s = tl.load(sin_ptr + i * (M // 2) + offs)
        if TRANSPOSE:
            s = -s
        a, b = tl.split(tl.permute(tl.reshape(y, (KP, NB, 2, S)), (0, 1, 3, 2)))  # (KP, NB, S) each
        a2 = c[None] * a - s[None] * b
        b2 = s[None] * a + c[None] * b
        return tl.reshape(tl.permute(tl.join(a2, b2), (0, 1, 3, 2)), (KP, M))

    @triton.jit
    def _stages(y, cos_ptr, sin_ptr, KP: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr,
                TRANSPOSE: tl.constexpr):
        """All butterfly stages: B y = S_{L-1} ... S_0 y, or B^T y = S_0^T ... S_{L-1}^T y."""
        if TRANSPOSE:
            for i in tl.static_range(LOG_M - 1, -1, -1):
                y = _stage(y, cos_ptr, sin_ptr, i, KP, M, True)
        else:
            for i in tl.static_range(LOG_M):
                y = _stage(y, cos_ptr, sin_ptr, i, KP, M, False)
        return y

    @triton.jit(do_not_specialize=["NROWS"])
    def _transform_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, q_ptr, stride_qi, stride_qj, NROWS,
                          K: tl.constexpr, KP: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr,
                          HAS_Q: tl.constexpr, TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr):
        """Without Q (K = 1) a program takes KP consecutive rows (more work per program); with Q, one row whose
        K segments (padded to KP) are the tile's rows. PRECISION of the Q mix: "ieee" for fp32 inputs, "tf32" for
        16-bit ones (its 10-bit mantissa is finer than theirs)."""
        seg = tl.arange(0, KP)
        if HAS_Q:
            row = tl.program_id(0).to(tl.int64)
            mask = seg[:, None] < K
            offs = row * K * M + seg[:, None] * M + tl.arange(0, M)[None, :]        # (KP, M)
        else:
            rows = tl.program_id(0).to(tl.int64) * KP + seg
            mask = rows[:, None] < NROWS
            offs = rows[:, None] * M + tl.arange(0, M)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        qmask = (seg[:, None] < K) & (seg[None, :] < K)
        if HAS_Q and not TRANSPOSE:     # y = B (Q x): mix the segments, then the stages
            q = tl.load(q_ptr + seg[:, None] * stride_qi + seg[None, :] * stride_qj, mask=qmask, other=0.0)
            x = tl.dot(q, x, input_precision=PRECISION)
        x = _stages(x, cos_ptr, sin_ptr, KP, M, LOG_M, TRANSPOSE)
        if HAS_Q and TRANSPOSE:         # y = Q^T (B^T x)
            q = tl.load(q_ptr + seg[None, :] * stride_qi + seg[:, None] * stride_qj, mask=qmask, other=0.0)
            x = tl.dot(q, x, input_precision=PRECISION)
        tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


# Pure butterflies in the shuffle kernel: rows per program. Every program loads all L x n/2 cos/sin pairs (fp32),
# i.e. L / ROWS times the bytes of its fp16 rows read and written: 6x at L = 12 and 2 rows. More rows cut that
# traffic but hold more registers (`--bench` sweeps 1-16 rows with each configuration's registers and spills: at
# n = 4096 16 rows spill; which count is fastest needs a GPU; `--compile` proves the default does not spill).
# n >= 16384: one row (two spill 8-120 bytes on sm_90 and sm_80).
ROWS_PER_PROGRAM = 2


def _kp(K):
    return 1 if K == 1 else max(16, triton.next_power_of_2(K))


def _launch_transform(x, cos, sin, Q, transpose):
    n = x.shape[-1]
    K = 1 if Q is None else Q.shape[0]
    m = n // K
    xf = x.reshape(-1, n).contiguous()
    y = torch.empty_like(xf)
    q = Q.float().contiguous() if Q is not None else cos       # any pointer when there is no Q
    R = xf.shape[0]
    kp = _kp(K) if Q is not None else ROWS_PER_PROGRAM if n < 16384 else 1
    if R:
        grid = (R if Q is not None else triton.cdiv(R, kp),)
        _launch(_transform_kernel, grid, xf, y, cos.float().contiguous(), sin.float().contiguous(), q,
                q.stride(0) if Q is not None else 0, q.stride(1) if Q is not None else 0, R,
                K=K, KP=kp, M=m, LOG_M=m.bit_length() - 1, HAS_Q=Q is not None,
                TRANSPOSE=transpose, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                num_warps=4 if n * kp <= 4096 else 8 if n * kp <= 16384 else 16)
    return y.view(x.shape)


# -----------------------------------------------------------------------------
# Triton: the butterfly as block matmuls. With L = log2 m stages split as L = g0 + g1, stages 0..g0-1 only mix
# indices inside contiguous runs of B0 = 2^g0, and stages g0..L-1 only mix indices equal mod B0:
#   B = G1 G0,  G0 = blockdiag over h < m/B0 of (B0, B0) blocks on positions h B0 + t,
#               G1 = blockdiag over lo < B0 of (B1, B1) blocks on positions t B0 + lo,   B1 = m / B0.
# Each group is one batched tl.dot per row tile (tensor cores) in place of g register shuffles. Two kernels:
# m <= HELD_M holds the blocks for a program's life; larger m streams them (2 x 64 x 4096 values at m = 4096 do
# not fit in one program's registers).

if HAVE_TRITON:
    @triton.jit
    def _mm(a, b, DOT: tl.constexpr):
        """a @ b (2-D, or 3-D batched) accumulated in fp32. DOT "fp16": fp16 operands on the tensor cores;
        "ieee" / "tf32": fp32 operands at that precision (see _dot_mode)."""
        if DOT == "fp16":
            c = tl.dot(a.to(tl.float16), b.to(tl.float16))
        else:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)
        return c

    @triton.jit(do_not_specialize=["NTILES", "NROWS"])
    def _bfly_block_kernel(x_ptr, y_ptr, w0_ptr, w1_ptr, q_ptr, NTILES, NROWS, K: tl.constexpr, TR: tl.constexpr,
                           M: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, HAS_Q: tl.constexpr,
                           DOT: tl.constexpr):
        """y = T x with B = G1 G0 as two batched dots per (TR, M) row tile. The blocks (and Q) are loaded once;
        the program then loops over tiles pid, pid + programs, ... (persistent). Pure (K = 1): a tile is TR rows;
        with Q: one row, its K segments (padded to TR) being the tile's rows, mixed by Q (TR, TR) @ X."""
        H: tl.constexpr = M // B0
        r = tl.arange(0, TR)
        cols = tl.arange(0, M)
        i0 = tl.arange(0, B0)
        w0 = tl.load(w0_ptr + (tl.arange(0, H)[:, None, None] * B0 + i0[None, :, None]) * B0 + i0[None, None, :])
        if B1 > 1:
            i1 = tl.arange(0, B1)
            w1 = tl.load(w1_ptr + (i0[:, None, None] * B1 + i1[None, :, None]) * B1 + i1[None, None, :])
        if HAS_Q:
            q = tl.load(q_ptr + r[:, None] * TR + r[None, :])                          # Q zero-padded to (TR, TR)
        for tile in range(tl.program_id(0), NTILES, tl.num_programs(0)):
            if HAS_Q:           # segment rows tile K + r
                ok = r < K
                offs = (r.to(tl.int64) + tile * K)[:, None] * M + cols[None, :]
            else:
                rows = r.to(tl.int64) + tile * TR
                ok = rows < NROWS
                offs = rows[:, None] * M + cols[None, :]
            x = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0)                     # (TR, M)
            if HAS_Q:
                x = _mm(q, x, DOT)
            # G0: (H, TR, B0) @ W0 (H, B0, B0), position h * B0 + t
            x = tl.permute(tl.reshape(x, (TR, H, B0)), (1, 0, 2))
            x = tl.reshape(tl.permute(_mm(x, w0, DOT), (1, 0, 2)), (TR, M))
            if B1 > 1:  # G1: (B0, TR, B1) @ W1 (B0, B1, B1), position t * B0 + lo
                x = tl.permute(tl.reshape(x, (TR, B1, B0)), (2, 0, 1))
                x = tl.reshape(tl.permute(_mm(x, w1, DOT), (1, 2, 0)), (TR, M))
            tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit(do_not_specialize=["NTILES", "NROWS"])
    def _bfly_stream_kernel(x_ptr, y_ptr, w0_ptr, w1_ptr, q_ptr, NTILES, NROWS, K: tl.constexpr, TR: tl.constexpr,
                            M: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, LO: tl.constexpr,
                            HAS_Q: tl.constexpr, DOT: tl.constexpr):
        """y = T x with B = G1 G0 for m too large to hold the blocks: each program re-reads them from global memory
        per row tile (all programs read the same m (B0 + B1) values, so they stay in L2). Per (TR, M) row tile,
        persistent as _bfly_block_kernel: pass 1 runs G0 one (TR, B0) chunk at a time, x -> y; pass 2 runs G1 in
        place on y (the program's own rows, just written: L2-hot), LO consecutive lo at once so that its loads are
        runs of LO values rather than single ones at stride B0. With Q: (Q X) W0 = Q (X W0), so Q mixes each
        chunk's segments before its G0 dot.
        The intermediate G0 x is stored in y's dtype. fp16: no cost, the "fp16" dot rounds its operands to fp16
        anyway; fp32: none. bf16: one more bf16 rounding where the held kernel keeps a tf32 operand: relative error
        2.9e-3 against 2.4e-3 at n = 4096 (round-to-nearest as on the GPU; the interpreter truncates: 6.4e-3)."""
        H: tl.constexpr = M // B0
        r = tl.arange(0, TR)
        i0 = tl.arange(0, B0)
        i1 = tl.arange(0, B1)
        j = tl.arange(0, LO)
        if HAS_Q:
            q = tl.load(q_ptr + r[:, None] * TR + r[None, :])                          # Q zero-padded to (TR, TR)
        for tile in range(tl.program_id(0), NTILES, tl.num_programs(0)):
            if HAS_Q:           # segment rows tile K + r
                ok = r < K
                base = (r.to(tl.int64) + tile * K) * M
            else:
                rows = r.to(tl.int64) + tile * TR
                ok = rows < NROWS
                base = rows * M                                                         # (TR,)
            for h in range(H):  # G0: y[:, h B0 + u] = sum_t x[:, h B0 + t] W0[h, t, u]
                offs = base[:, None] + (h * B0 + i0)[None, :]                           # (TR, B0)
                x = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0)
                if HAS_Q:
                    x = _mm(q, x, DOT)
                w0 = tl.load(w0_ptr + h * B0 * B0 + i0[:, None] * B0 + i0[None, :])    # (B0, B0)
                tl.store(y_ptr + offs, _mm(x, w0, DOT).to(y_ptr.dtype.element_ty), mask=ok[:, None])
            # bar.sync orders pass 1's global writes before pass 2's reads for every thread of this CTA (PTX, CTA scope)
            tl.debug_barrier()
            for lo in range(0, B0, LO):     # G1: y[:, u B0 + lo] = sum_t y[:, t B0 + lo] W1[lo, t, u]
                offs = base[None, :, None] + (i1[None, None, :] * B0 + lo + j[:, None, None])   # (LO, TR, B1)
                z = tl.load(y_ptr + offs, mask=ok[None, :, None], other=0.0)
                w1 = tl.load(w1_ptr + ((lo + j)[:, None, None] * B1 + i1[None, :, None]) * B1
                             + i1[None, None, :])                                      # (LO, B1, B1)
                tl.store(y_ptr + offs, _mm(z, w1, DOT).to(y_ptr.dtype.element_ty), mask=ok[None, :, None])


def _block_split(m):
    """(B0, B1) for the block kernels, or None. Rule: every dot dimension 16..128 (16: the tensor-core minimum;
    128: the largest that compiles without spills), so m = 16..16384. m <= 128 is one dense m x m block (B1 = 1);
    larger m splits evenly, B1 = 2^floor(L/2) <= B0, which makes B0 + B1 smallest: the dot depth per value, so
    the tensor-core work and the block bytes per row. 256 = 16 x 16, 4096 = 64 x 64, 8192 = 128 x 64. Up to
    HELD_M a program holds its blocks (at most 128 x 129 values); beyond, it streams them (_bfly_stream_kernel)."""
    if m < 16 or m > 16384:
        return None
    if m <= 128:
        return (m, 1)
    B1 = 1 << ((m.bit_length() - 1) // 2)
    return (m // B1, B1)


HELD_M = 256
# Stream kernel tile. TR = 32 rows: a resident program (one per SM at > 128 registers x 256 threads) keeps
# 32 x m intermediate values in L2, 33 MiB over an H100's 132 SMs at m = 4096 in fp16 (L2: 50 MB); 64 rows would
# halve the block re-reads but overflow it. LO (lo per pass-2 dot) as large as keeps its accumulator
# LO x TR x B1 within STREAM_VALUES and its W1 slice LO x B1 x B1 within twice that, which compiles without
# spills (`--compile`); m = 4096: LO = 8, pass-2 runs of 16 bytes. fp32 ("ieee": FMA units, whole K slices per
# thread) halves TR and both budgets and does not pipeline.
STREAM_VALUES = 16384


def butterfly_blocks(cos, sin, B0):
    """The blocks of B(m) = G1 G0 for the split m = B0 x B1, laid out for x @ W (x a row): W0 (m/B0, B0, B0) with
    W0[h, t, u] = G0[h B0 + u, h B0 + t], and W1 (B0, B1, B1) with W1[lo, t, u] = G1[u B0 + lo, t B0 + lo].
    G0 is stages 0..g0-1 (B0 = 2^g0), G1 the rest. Float64: each group's stages, the others set to the identity,
    run on basis vectors (e_t in every block at once: the blocks do not overlap)."""
    L, m = cos.shape[0], 2 * cos.shape[1]
    B1 = m // B0
    c, s = cos.double(), sin.double()
    one, zero = torch.ones_like(c), torch.zeros_like(s)
    g0 = (torch.arange(L, device=c.device) < B0.bit_length() - 1)[:, None]           # stages of G0
    E0 = torch.eye(B0, dtype=torch.float64, device=c.device).repeat(1, m // B0)        # (B0, m): e_t at h B0 + t
    W0 = bq.butterfly_apply(E0, torch.where(g0, c, one), torch.where(g0, s, zero))
    W0 = W0.view(B0, m // B0, B0).permute(1, 0, 2)
    E1 = torch.eye(B1, dtype=torch.float64, device=c.device).repeat_interleave(B0, 1)  # (B1, m): e_t at t B0 + lo
    W1 = bq.butterfly_apply(E1, torch.where(g0, one, c), torch.where(g0, zero, s))
    W1 = W1.view(B1, B1, B0).permute(2, 0, 1)
    return W0, W1


def _blocks(cos, sin, B0, dtype):
    """butterfly_blocks, cached on the cos tensor (OnlineTransform keeps one cos per set of angles)."""
    key = (sin.data_ptr(), cos._version, sin._version, B0, dtype)
    hit = getattr(cos, "_bq_blocks", None)
    if hit is None or hit[0] != key:
        W0, W1 = butterfly_blocks(cos, sin, B0)
        hit = cos._bq_blocks = (key, W0.to(dtype).contiguous(), W1.to(dtype).contiguous())
    return hit[1], hit[2]


def _launch_blocks(x, cos, sin, Q):
    """Either block kernel for T x (m = 16..16384, see _block_split). Blocks (and Q) in fp16 for the "fp16" dot and
    for the streamed "tf32" one (tf32 keeps fp16's 10 mantissa bits: half the bytes re-read, no precision lost)."""
    n = x.shape[-1]
    K = 1 if Q is None else Q.shape[0]
    m = n // K
    B0, B1 = _block_split(m)
    xf = x.reshape(-1, n).contiguous()
    y = torch.empty_like(xf)
    R = xf.shape[0]
    dot = _dot_mode(x.dtype)
    stream = m > HELD_M
    W0, W1 = _blocks(cos, sin, B0, torch.float16 if dot == "fp16" or (stream and dot == "tf32") else torch.float32)
    fma = 2 if dot == "ieee" else 1
    TR = _kp(K) if Q is not None else 32 // fma if stream else 16
    q = W0                                      # any pointer when there is no Q
    if Q is not None:
        q = torch.zeros(TR, TR, device=x.device, dtype=W0.dtype)
        q[:K, :K] = Q
    tiles = R if Q is not None else triton.cdiv(R, TR)
    grid = (min(tiles, _programs_wanted(x.device)),)
    if R and stream:
        LO = min(B0, STREAM_VALUES // fma // (TR * B1), 2 * STREAM_VALUES // fma // (B1 * B1))
        _launch(_bfly_stream_kernel, grid, xf, y, W0, W1, q, tiles, R, K=K, TR=TR, M=m, B0=B0, B1=B1, LO=LO,
                HAS_Q=Q is not None, DOT=dot, num_warps=8, num_stages=1 if dot == "ieee" else 2)
        # num_stages=2: prefetch the next chunk (one 8-warp program per SM has nothing else to hide L2 latency)
    elif R:
        _launch(_bfly_block_kernel, grid, xf, y, W0, W1, q, tiles, R,
                K=K, TR=TR, M=m, B0=B0, B1=B1, HAS_Q=Q is not None, DOT=dot,
                num_warps=4 if TR * m + m * (B0 + B1) <= 8192 else 8, num_stages=1)   # 8 warps: big tile + blocks
        # num_stages=1: pipelining the persistent loop's loads double-buffers the tile in shared memory (n = 11008:
        # 144-176 KB, past the A100's 163 KB)
    return y.view(x.shape)


# -----------------------------------------------------------------------------
# Triton: packed low-bit matmul  y = x @ (s * (q - z))^T.
# A weight (row r, column k) sits at bit (r * IN + k) * BITS of the stream. ALIGNED (2/4/8 bits, rows a whole
# number of words): a word holds 32/BITS consecutive values, unpacked with shifts. Otherwise (3 bits) each value
# is read from the two words around its offset.

if HAVE_TRITON:
    @triton.jit
    def _dequant_tile(w_ptr, s_ptr, z_ptr, rn, k0, OUT, IN, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K) tile of dequantized weights (fp32): rows rn, columns k0 .. k0 + BLOCK_K."""
        rk = k0 + tl.arange(0, BLOCK_K)
        nmask = rn < OUT
        kmask = rk < IN
        if ALIGNED:     # load each word once, expand it to its 32/BITS values
            PER: tl.constexpr = 32 // BITS
            rkw = k0 // PER + tl.arange(0, BLOCK_K // PER)
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * (IN // PER) + rkw[None, :],
                        mask=nmask[:, None] & (rkw[None, :] < IN // PER), other=0)
            shifts = tl.arange(0, PER) * BITS
            q = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K))
        else:           # read each value from the two words around its bit offset
            bit = (rn[:, None].to(tl.int64) * IN + rk[None, :]) * BITS
            wi = bit >> 5
            m2 = nmask[:, None] & kmask[None, :]
            lo = tl.load(w_ptr + wi, mask=m2, other=0).to(tl.int64) & 0xFFFFFFFF
            hi = tl.load(w_ptr + wi + 1, mask=m2 & (wi + 1 < (OUT * IN * BITS + 31) // 32), other=0).to(tl.int64) & 0xFFFFFFFF
            q = (((hi << 32) | lo) >> (bit & 31)) & ((1 << BITS) - 1)
        if GROUP % BLOCK_K == 0:    # one scale and zero per row for the whole tile
            gi = rn.to(tl.int64) * G + k0 // GROUP
            s = tl.load(s_ptr + gi, mask=nmask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + gi, mask=nmask, other=0.0).to(tl.float32)[:, None]
        else:
            gi = rn[:, None].to(tl.int64) * G + (rk // GROUP)[None, :]
            gm = nmask[:, None] & kmask[None, :]
            s = tl.load(s_ptr + gi, mask=gm, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gi, mask=gm, other=0.0).to(tl.float32)
        return s * (q.to(tl.float32) - z)

    @triton.jit(do_not_specialize=["M", "G"])
    def _qmatmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, OUT, IN, G, K_PER_SPLIT, GROUP: tl.constexpr,
                        BITS: tl.constexpr, ALIGNED: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """y tile (BLOCK_M, BLOCK_N) = x tile @ dequant(W tile)^T over columns [pid_k, pid_k + 1) * K_PER_SPLIT.
        Decode (M <= 16): BLOCK_M = 16, narrow BLOCK_N, and split-K (several programs per tile, ATOMIC: summed with
        fp32 atomics into y) so that enough programs stream the packed weights; prefill: large tiles, SPLIT = 1.
        DOT: "ieee" (fp32 x: exact fp32), "fp16" (fp16 x: the weight tile is rounded to fp16 and the dot runs on
        the fp16 tensor cores, accumulating in fp32, as an fp16 matmul with an fp16 weight does), "tf32" (bf16 x,
        upcast: the interpreter cannot run a bf16 tl.dot, triton-lang/triton#11584, and CI must run this path)."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * K_PER_SPLIT
        for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):      # masks cover the ragged end
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * IN + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < IN), other=0.0)
            w = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, k0, OUT, IN, G, GROUP, BITS, ALIGNED, BLOCK_N, BLOCK_K)
            acc += _mm(x, tl.trans(w), DOT)
        ptrs = y_ptr + rm[:, None].to(tl.int64) * OUT + rn[None, :]
        ymask = (rm[:, None] < M) & (rn[None, :] < OUT)
        if ATOMIC:
            tl.atomic_add(ptrs, acc, mask=ymask)        # y is fp32 and zeroed: the splits' partial sums
        else:
            tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit(do_not_specialize=["G"])
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, OUT, IN, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out (OUT, IN) = s * (q - z), one (BLOCK_N, BLOCK_K) tile per program."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, k0, OUT, IN, G, GROUP, BITS, ALIGNED, BLOCK_N, BLOCK_K)
        tl.store(out_ptr + rn[:, None].to(tl.int64) * IN + rk[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(rn[:, None] < OUT) & (rk[None, :] < IN))

    @triton.jit(do_not_specialize=["M", "KT", "TILES_PER_SPLIT"])
    def _gemv_slab_kernel(x_ptr, r_ptr, y_ptr, M, OUT, IN, KT, TILES_PER_SPLIT, BITS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """Decode y (M <= 16 rows, fp32, zeroed) += x @ dequant(W)^T in the slab layout (repack_slabs). Program
        (n, k) reads TILES_PER_SPLIT consecutive records of output block n: one contiguous run of memory holding
        the packed words and their scales and zeros, the layout of Marlin and gemlite."""
        PER: tl.constexpr = 32 // BITS
        WPR: tl.constexpr = BLOCK_K // PER                      # words per row of a record
        REC: tl.constexpr = BLOCK_N * (WPR + 1)                 # (BLOCK_N, WPR) words, then BLOCK_N scale | zero
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rm = tl.arange(0, 16)
        rn = tl.arange(0, BLOCK_N)
        shifts = tl.arange(0, PER) * BITS
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        kt0 = pid_k * TILES_PER_SPLIT
        for kt in range(kt0, tl.minimum(kt0 + TILES_PER_SPLIT, KT)):
            rec = r_ptr + (pid_n.to(tl.int64) * KT + kt) * REC
            w = tl.load(rec + rn[:, None] * WPR + tl.arange(0, WPR)[None, :])                 # (BLOCK_N, WPR)
            q = tl.reshape((w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K))
            sz = tl.load(rec + BLOCK_N * WPR + rn)                                           # fp16 bits: s | z << 16
            s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            z = (sz >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            w = s[:, None] * (q.to(tl.float32) - z[:, None])                                  # w = s (q - z)
            rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * IN + rk[None, :], mask=rm[:, None] < M, other=0.0)
            acc += _mm(x, tl.trans(w), DOT)
        rn = pid_n * BLOCK_N + rn
        tl.atomic_add(y_ptr + rm[:, None] * OUT + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < OUT))


@functools.lru_cache(maxsize=None)
def _programs_wanted(device):
    """Programs that keep every SM streaming: a few per SM (the interpreter pretends to be an H100). Cached:
    it runs on every decode matmul."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return 4 * sms


def _aligned(bits, in_features):
    return 32 % bits == 0 and (in_features * bits) % 32 == 0


def _dot_mode(dtype):
    """The matmul kernels' DOT for an input dtype (see _qmatmul_kernel)."""
    return {torch.float16: "fp16", torch.bfloat16: "tf32"}.get(dtype, "ieee")


def dequant_triton(words, scales, zeros, bits, group, out_features, in_features, dtype):
    """The whole weight in `dtype`: one pass over the packed stream (for prefill, see qmatmul_triton)."""
    out = torch.empty(out_features, in_features, device=words.device, dtype=dtype)
    BN, BK = 32, 128
    _launch(_dequant_kernel, (triton.cdiv(out_features, BN), triton.cdiv(in_features, BK)),
        words, scales, zeros, out, out_features, in_features, scales.shape[1],
        GROUP=in_features if group == 0 else group, BITS=bits, ALIGNED=_aligned(bits, in_features),
        BLOCK_N=BN, BLOCK_K=BK, num_warps=4)
    return out


PREFILL_ROWS = int(os.environ.get("BQ_PREFILL_ROWS", "256"))    # from here on: dequantize, then cuBLAS


def qmatmul_triton(x, words, scales, zeros, bits, group, out_features, in_features):
    """Three regimes. Decode (<= 16 rows): the slab GEMV where _slab_bk allows, else the split-K tile GEMV;
    both bound by reading the packed weights. Middle: the fused
    dequant-GEMM. Prefill (>= PREFILL_ROWS rows): the fused kernel would dequantize every weight tile once per
    block of rows, so dequantize once (one pass, ~out*in*2 bytes written) and let cuBLAS do the GEMM; the H100
    table had the fused kernel 7x behind fp16 cuBLAS at 2048 rows."""
    x = x.contiguous()
    M = x.shape[0]
    if M >= PREFILL_ROWS:
        return x @ dequant_triton(words, scales, zeros, bits, group, out_features, in_features, x.dtype).T
    if M <= 16 and _slab_bk(bits, group, in_features, x.dtype):
        return gemv_slab_triton(x, words, scales, zeros, bits, group, out_features, in_features)
    g = in_features if group == 0 else group
    # Tiles, the largest that compile without spills on sm_90 and sm_80 at every bit width (`--compile`): decode
    # 16 x 32 x 32 (3 bits reads each value from an int64 pair; BLOCK_K = 64 spills in fp32), the GEMM 64 x 64 x 32,
    # or 32 x 32 x 32 for fp32 ("ieee" runs on FMA units with whole K slices per thread: 64 x 64 spills ~1 KB).
    if M <= 16:
        BM, BN, BK = 16, 32, 32
    else:
        BM = BN = 32 if x.dtype == torch.float32 else 64
        BK = 32
    tiles = triton.cdiv(M, BM) * triton.cdiv(out_features, BN)
    k_tiles = triton.cdiv(in_features, BK)
    split = 1
    if M <= 16:             # split K until the grid fills the device
        split = max(1, min(k_tiles, triton.cdiv(_programs_wanted(x.device), tiles)))
    per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per_split)     # no empty splits
    y = (torch.zeros if split > 1 else torch.empty)(M, out_features, device=x.device,
                                                    dtype=torch.float32 if split > 1 else x.dtype)
    _launch(_qmatmul_kernel, (triton.cdiv(M, BM), triton.cdiv(out_features, BN), split),
        x, words, scales, zeros, y, M, out_features, in_features, scales.shape[1], per_split * BK, GROUP=g,
        BITS=bits, ALIGNED=_aligned(bits, in_features), ATOMIC=split > 1, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        DOT=_dot_mode(x.dtype), num_warps=4, num_stages=3)
    return y.to(x.dtype)



def _slab_bk(bits, group, in_features, dtype):
    """BLOCK_K of the slab GEMV, or None where it does not apply. Rule: 2/4/8 bits (a word holds whole values),
    and BLOCK_K (128, else 64; fp32: 64) divides the width and the group, so that a record is full and has one
    scale and zero per row. 3 bits, and widths such as 172, take the split-K tile kernel."""
    g = in_features if group == 0 else group
    for bk in ((64,) if dtype == torch.float32 else (128, 64)):     # fp32 spills at 128 (`--compile`)
        if 32 % bits == 0 and in_features % bk == 0 and g % bk == 0:
            return bk
    return None


def repack_slabs(words, scales, zeros, bits, group, out_features, in_features, BN=32, BK=128):
    """The slab layout: for each block of BN output rows, its in/BK tile records one after another; a record is
    the tile's packed words (BN, BK bits / 32), then one int32 per row with its fp16 scale (low half) and zero
    (high half). Rows past out_features are zero. The packed stream needs no unpacking: a row is whole words."""
    KT, NB, per = in_features // BK, triton.cdiv(out_features, BN), 32 // bits
    w = words[: out_features * in_features // per].view(out_features, KT, BK // per)
    gi = torch.arange(KT, device=words.device) * BK // (in_features if group == 0 else group)
    s = scales.half()[:, gi].view(torch.int16).to(torch.int64) & 0xFFFF
    z = zeros.half()[:, gi].view(torch.int16).to(torch.int64) & 0xFFFF
    sz = s | (z << 16)
    sz = torch.where(sz >= 2 ** 31, sz - 2 ** 32, sz).to(torch.int32)                    # (out, KT)
    pad = NB * BN - out_features
    w, sz = F.pad(w, (0, 0, 0, 0, 0, pad)), F.pad(sz, (0, 0, 0, pad))
    rec = torch.cat((w.view(NB, BN, KT, BK // per).permute(0, 2, 1, 3).reshape(NB, KT, BN * BK // per),
                     sz.view(NB, BN, KT).permute(0, 2, 1)), dim=2)
    return rec.contiguous().view(-1)


def gemv_slab_triton(x, words, scales, zeros, bits, group, out_features, in_features):
    """Decode y = x @ dequant(Wq)^T (M <= 16) over the slab layout, split over K until the grid fills the device.
    The slab copy is made on the first call and cached on `words` (it sits beside the packed stream: twice the
    weight memory until a file format stores only slabs)."""
    BN, BK = 32, _slab_bk(bits, group, in_features, x.dtype)
    key = (scales.data_ptr(), zeros.data_ptr(), words._version, scales._version, zeros._version, BK)
    hit = getattr(words, "_bq_slabs", None)
    if hit is None or hit[0] != key:
        hit = words._bq_slabs = (key, repack_slabs(words, scales, zeros, bits, group, out_features, in_features,
                                                   BN, BK))
    M = x.shape[0]
    KT, NB = in_features // BK, triton.cdiv(out_features, BN)
    per = triton.cdiv(KT, max(1, min(KT, triton.cdiv(_programs_wanted(x.device), NB))))
    y = torch.zeros(M, out_features, device=x.device, dtype=torch.float32)
    _launch(_gemv_slab_kernel, (NB, triton.cdiv(KT, per)), x.contiguous(), hit[1], y, M, out_features,
            in_features, KT, per, BITS=bits, BLOCK_N=BN, BLOCK_K=BK, DOT=_dot_mode(x.dtype), num_warps=4)
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# dispatch: the one place that picks Triton or the reference, and which kernel

def _transform_supported(x, Q):
    """Rule: Triton for CUDA tensors except m > 16384 (the shuffle kernel spills 1.5-14 KB at 32768), composites
    with m < 16 or K > 128 (tile shapes), and fp32 with a Q tile (next_pow2(K), m) over 8192 values (n = 11008:
    64 x 256), where the fp32 "ieee" Q dot runs on FMA units and spills in every kernel that has it (`--compile`);
    the reference (cuBLAS for Q) runs those."""
    K = 1 if Q is None else Q.shape[0]
    m = x.shape[-1] // K
    if not use_triton(x) or m < 2 or m > 16384 or (Q is not None and (m < 16 or K > 128)):
        return False
    return not (x.dtype == torch.float32 and Q is not None and _kp(K) * m > 8192)


def butterfly(x, cos, sin, Q=None):
    """T x for the online transform (inference; no gradient). Rule, by the butterfly's width m (n = K m):
      m = 16..256: the held-blocks kernel (every composite n here, e.g. 576 = 36 x 16, 1536 = 12 x 128,
        11008 = 43 x 256, and pure n <= 256): tensor-core dots, blocks loaded once per program.
      m = 512..16384 in fp16 / bf16: the stream kernel (pure 4096, 8192; composites such as 14336 = 28 x 512).
      fp32 at m = 512..16384: the shuffle kernel. (_transform_supported sends the rest to the reference.)
    Neither has run on a GPU. At n = 4096 the stream kernel is the default on the bytes model (`--bench`,
    _l2_bytes): per fp16 or bf16 row it moves 82 KB through L2 (the row in and out, its 64 x 64 blocks re-read
    once per 32 rows, the intermediate written and read back at half-sector runs) against the shuffle kernel's
    115 KB (all L x m/2 fp32 cos/sin pairs re-read per 2-row program). Issue does not decide it: sm_90 SASS per
    row is 3.9K warp instructions against 5.7K in fp16, 6.5K against 5.7K in bf16, ~60 us for 8192 rows on an
    H100's 528 schedulers at 1.7 GHz, when 671 MB of L2 traffic takes longer at any L2 bandwidth under 11 TB/s.
    fp32 is the other way round: fp32 blocks on FMA units (B0 + B1 = 128 FMAs per value against 2 L = 24) move
    229 KB against 131 KB, so fp32 keeps the shuffle kernel. None spills at any width it is given (`--compile`)."""
    if _transform_supported(x, Q):
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        m = x.shape[-1] // (1 if Q is None else Q.shape[0])
        if _block_split(m) and (m <= HELD_M or x.dtype != torch.float32):
            return _launch_blocks(x, cos, sin, Q)
        return _launch_transform(x, cos, sin, Q, False)
    return transform_ref(x, cos, sin, Q)


def qmatmul(x, words, scales, zeros, bits, group, out_features, in_features, pre=None):
    """y = (pre x) @ dequant(Wq)^T; pre: an OnlineTransform fused in front of this linear, or None."""
    if pre is not None:
        Q = pre.Q if pre.K > 1 else None
        if not pre.dense and x.shape[0] <= min(FUSE_ROWS, 16) and _transform_supported(x, Q):
            cos, sin = pre.cos_sin()
            return qmatmul_transformed_triton(x, cos, sin, Q, words, scales, zeros, bits, group, out_features,
                                              in_features)
        x = pre(x)
    if use_triton(x):
        return qmatmul_triton(x, words, scales, zeros, bits, group, out_features, in_features)
    return qmatmul_ref(x, words, scales, zeros, bits, group, out_features, in_features)


# -----------------------------------------------------------------------------
# modules that llama.py swaps in

class QuantLinear(nn.Module):
    """y = x @ (s * (q - z))^T from packed integers (butterflyquant.pack): the weight is never stored in floating
    point (prefill on a GPU dequantizes a temporary copy, see qmatmul_triton). Built from the packed stream, the
    fp16 scales and zeros (out, groups) and the shape; `from_integers` packs integer weights first."""

    def __init__(self, qweight, scales, zeros, bits, group, in_features, out_features):
        super().__init__()
        G = bq.ngroups(in_features, group)
        words = -(-out_features * in_features * bits // 32)
        if (qweight.dtype != torch.int32 or tuple(qweight.shape) != (words,) or
                any(t.dtype != torch.float16 or tuple(t.shape) != (out_features, G) for t in (scales, zeros))):
            raise ValueError(f"packed tensors do not fit a {out_features} x {in_features} W{bits} g{group} linear: "
                             f"qweight {qweight.dtype} {tuple(qweight.shape)} (want int32 ({words},)), scales "
                             f"{scales.dtype} {tuple(scales.shape)}, zeros {zeros.dtype} {tuple(zeros.shape)} "
                             f"(want float16 ({out_features}, {G}))")
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.pre = None     # an OnlineTransform moved in front of this linear by llama.fuse_transforms

    @classmethod
    def from_integers(cls, q, scale, zero, bits, group):
        """From butterflyquant.quantize / gptq output: q (out, in) integers, scale and zero (out, groups)."""
        return cls(bq.pack(q, bits), scale.half(), zero.half(), bits, group, q.shape[1], q.shape[0])

    def forward(self, x):   # (..., in) -> (..., out)
        y = qmatmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.bits, self.group,
                    self.out_features, self.in_features, self.pre)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}"


class OnlineTransform(nn.Module):
    """x -> T x at inference, built from the file's description of T (`entry`, see butterflyquant.Transform.export):
      {n, dense: True, kind, seed}   a fixed baseline, rebuilt from its seed (butterflyquant.fixed_matrix);
      {n, dense: False, K, m}        a learned T = Q (x) Butterfly(m) with angles theta (log2 m, m/2) and, for
                                     K > 1, the K x K factor Q (zeros when not given: to be loaded)."""

    def __init__(self, entry, theta=None, Q=None):
        super().__init__()
        try:
            n, dense = int(entry["n"]), bool(entry["dense"])
            K, m = (1, n) if dense else (int(entry["K"]), int(entry["m"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad transform description {entry!r}: {type(e).__name__} {e}") from None
        if n < 1 or K < 1 or K * m != n or (not dense and (not bq.is_pow2(m) or m < 2)):
            raise ValueError(f"bad transform description {entry!r}: need n = K * m with m a power of two >= 2")
        self.entry, self.n, self.K, self.dense = dict(entry), n, K, dense
        if dense:
            if entry.get("kind") not in ("hadamard", "random", "identity") or not isinstance(entry.get("seed"), int):
                raise ValueError(f"bad fixed transform description {entry!r}: needs kind and an integer seed")
            self.register_buffer("M", bq.fixed_matrix(n, entry["kind"], entry["seed"]), persistent=False)
        else:
            shapes = dict(theta=(m.bit_length() - 1, m // 2), Q=(K, K))
            for name, t in (("theta", theta), ("Q", Q)):
                if name == "Q" and K == 1:
                    if t is not None:
                        raise ValueError(f"a transform with K = 1 has no Q (got {tuple(t.shape)})")
                    continue
                t = torch.zeros(shapes[name]) if t is None else t
                if t.dtype != torch.float32 or tuple(t.shape) != shapes[name]:
                    raise ValueError(f"transform tensor {name}: {t.dtype} {tuple(t.shape)}, want float32 {shapes[name]}")
                self.register_buffer(name, t)
        self._cs = None         # (theta._version, cos, sin): cos/sin once per set of angles, not per call

    def forward(self, x):
        if self.dense:
            return x @ self.M.T.to(x.dtype)
        return butterfly(x, *self.cos_sin(), self.Q if self.K > 1 else None)

    def cos_sin(self):
        if self._cs is None or self._cs[0] != self.theta._version:     # load_state_dict copies in place
            self._cs = (self.theta._version, self.theta.cos().contiguous(), self.theta.sin().contiguous())
        return self._cs[1:]

    def _apply(self, fn, recurse=True):
        """model.half() or .to(bfloat16) moves the angles and Q but keeps them fp32: rounded angles would make T
        differ from the T the weights were quantized with (the kernels compute in fp32 anyway)."""
        keep = {k: b for k, b in self._buffers.items() if k in ("theta", "Q")}
        super()._apply(fn, recurse)
        for k, b in keep.items():
            self._buffers[k] = b.to(self._buffers[k].device)
        self._cs = None
        return self

    def extra_repr(self):
        return f"n={self.n}, " + (f"dense {self.entry['kind']}" if self.dense else f"K={self.K}")



# -----------------------------------------------------------------------------
# compile for real GPUs on any machine:  python kernels.py --compile
# triton.compile(ASTSource, GPUTarget) yields PTX and a cubin with no GPU present; ptxas -v reports registers,
# spills and stack. sm_90 (H100) runs triton's ptxas-blackwell, sm_80 (A100) its ptxas, as at run time.

NS = (576, 1536, 4096, 11008)       # SmolLM2-135M's dim and hidden width, LLaMA-2-7B's
TRANSFORM_NS = (512, 1024, 2048, 8192, 16384, 14336)    # T x only: the stream kernel's other widths, and m = 512
# in a composite (14336 = 28 x 512: LLaMA-3-8B's hidden width)
TARGETS = {90: ("H100", "sm_90a", 232448), 80: ("A100", "sm_80", 166912)}    # name, ptxas arch, smem per block


def _recorded(f):
    """The launches f() makes, as (kernel, args, meta), none of them run."""
    global _RECORD
    _RECORD = []
    try:
        f()
    finally:
        got, _RECORD = _RECORD, None
    return got


def dispatch_launches(ns=NS, transform_ns=TRANSFORM_NS, group=128,
                      dtypes=(torch.float32, torch.float16, torch.bfloat16), experimental=False):
    """Every launch the dispatch can make at widths ns, recorded on meta tensors (nothing runs):
    butterfly() for each dtype; qmatmul() (n x n) for each dtype, bit width and row regime (decode <= 16 rows,
    GEMM, prefill >= PREFILL_ROWS); with `experimental`, also the fused decode kernel (FUSE_ROWS on) and the
    Triton backward. At widths transform_ns, butterfly() only. -> [(label, kernel, args, meta)]"""
    global FUSE_ROWS
    out = []

    def record(label, f):
        out.extend((label, *g) for g in _recorded(f))

    meta = dict(device="meta")
    for n in ns + transform_ns:
        K, m = bq.kron_split(n)
        cos = sin = torch.empty(m.bit_length() - 1, m // 2, **meta)
        Q = torch.empty(K, K, **meta) if K > 1 else None
        pre = OnlineTransform(dict(n=n, dense=False, K=K, m=m)).to("meta")
        for dt in dtypes:
            name = str(dt).replace("torch.", "")
            for rows in (1, 17):        # the row count changes the grid only
                x = torch.empty(rows, n, dtype=dt, **meta)
                record(f"butterfly n={n} {name}", lambda: butterfly(x, cos, sin, Q))
            for bits in ((2, 3, 4, 8) if n in ns else ()):
                G = bq.ngroups(n, group)
                args = (torch.empty(-(-n * n * bits // 32), dtype=torch.int32, **meta),
                        torch.empty(n, G, dtype=torch.float16, **meta), torch.empty(n, G, dtype=torch.float16, **meta),
                        bits, group, n, n)
                for rows, regime in ((1, "decode"), (17, "gemm"), (PREFILL_ROWS, "prefill")):
                    x = torch.empty(rows, n, dtype=dt, **meta)
                    record(f"qmatmul {n}x{n} W{bits} g{group} {name} {regime}", lambda: qmatmul(x, *args))
                if not experimental:
                    continue
                keep, FUSE_ROWS = FUSE_ROWS, 16
                try:
                    record(f"experimental: fused decode {n}x{n} W{bits} {name}",
                           lambda: qmatmul(torch.empty(1, n, dtype=dt, **meta), *args, pre=pre))
                finally:
                    FUSE_ROWS = keep
        y = torch.empty(4, n, **meta)
        if experimental and n in ns:
            record(f"experimental: backward n={n} float32",
                   lambda: _launch_transform_bwd(y, y, cos, sin, Q, (m.bit_length() - 1, m // 2)))
    return out


def _spec(kernel, args, meta, cap):
    """The (signature, constexprs, attrs, options) that launching kernel(*args, **meta) compiles on target cap:
    Triton's own binder, so integers and pointers are specialized as at run time."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", cap, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    _, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    opts = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    return kernel.__name__, signature, constexprs, attrs, opts, cap


def _ptxas_facts(log):
    grab = lambda pat: max([int(v) for v in re.findall(pat, log)] or [0])       # noqa: E731
    return dict(regs=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


def _compile(spec):
    """Compile one specialization for its target -> static facts (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, signature, constexprs, attrs, opts, cap = spec
    triton.knobs.nvidia.dump_ptxas_log = True           # triton prints ptxas -v; a cache hit prints nothing
    t0, log = time.perf_counter(), io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(globals()[name], signature, constexprs, attrs),
                               target=GPUTarget("cuda", cap, 32), options=opts)
    except Exception as e:      # reported per configuration; the test fails on it
        return dict(error=f"{type(e).__name__}: {e}"[-2000:])
    log = log.getvalue()
    if "Used" not in log:       # from triton's cache: run ptxas -v on the cached PTX, as triton does
        tool = triton.knobs.nvidia.ptxas_blackwell if cap >= 90 else triton.knobs.nvidia.ptxas
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            log = subprocess.run([tool.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={TARGETS[cap][1]}", f.name,
                                  "-o", os.devnull], capture_output=True, text=True).stderr
    return dict(_ptxas_facts(log), shared=k.metadata.shared, seconds=round(time.perf_counter() - t0, 1))


def compile_report(launches=None, caps=(90, 80), workers=None, experimental=False):
    """Compile each distinct specialization of `launches` (default: dispatch_launches()) for each target, in
    parallel processes. -> rows: kernel, target, constexprs, warps, the labels that launch it, static facts."""
    jobs = {}
    for label, kernel, args, meta in (dispatch_launches(experimental=experimental) if launches is None else launches):
        for cap in caps:
            spec = _spec(kernel, args, meta, cap)
            jobs.setdefault(repr(spec), (spec, []))[1].append(label)
    with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count(),
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        facts = pool.map(_compile, [spec for spec, _ in jobs.values()])
        rows = []
        for (spec, labels), f in zip(jobs.values(), facts):
            name, _, constexprs, _, opts, cap = spec
            cx = {globals()[name].arg_names[i]: v for (i,), v in constexprs.items()}
            rows.append(dict(kernel=name, cap=cap, gpu=TARGETS[cap][0], smem_limit=TARGETS[cap][2],
                             constexprs=cx, warps=opts.get("num_warps"),
                             labels=sorted(set(labels)), key=repr(spec[:5]), **f))
    return rows


def _facts_str(f):
    if "error" in f:
        return "ERROR"
    return f"{f['regs']} / {f['spill_stores']}+{f['spill_loads']} B / {f['shared'] // 1024} KB"


def compile_main(json_path=None, experimental=False):
    t0 = time.perf_counter()
    rows = compile_report(experimental=experimental)
    print(f"# {len(rows)} compiles ({len({r['key'] for r in rows})} specializations x {len(TARGETS)} targets) in "
          f"{time.perf_counter() - t0:.0f} s; registers / spill stores+loads / shared memory\n")
    print("| kernel | constexprs | warps | launched by | H100 sm_90 | A100 sm_80 |\n|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault(r["key"], {})[r["cap"]] = r
    for pair in by.values():
        r = next(iter(pair.values()))
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"| {r['kernel']} | {cx} | {r['warps']} | {'; '.join(r['labels'])} | "
              f"{_facts_str(pair.get(90, {}))} | {_facts_str(pair.get(80, {}))} |")
    bad = [r for r in rows if "error" in r or r["spill_stores"] or r["spill_loads"] or r["shared"] > r["smem_limit"]]
    for r in bad:
        print(f"FAIL {r['gpu']} {r['kernel']} {r['labels'][0]}: {r.get('error') or _facts_str(r)}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return not bad


# -----------------------------------------------------------------------------
# benchmark:  python kernels.py --bench
# Beside each configuration: its static facts on sm_90 (registers / spill bytes / shared memory), the bytes a
# call must move at the least (activations in and out, cos/sin or Q, packed words, scales, zeros), and the time
# the copy bandwidth allows for them (the roofline). On a GPU: measured time and % of that roofline.

H100_COPY_GBS = 2968    # the README's H100 measurement (clone of 256 MiB); the roofline's bandwidth with no GPU


def _median_s(f, reps=5):
    """CPU seconds per call: median of reps after one warm-up (triton.testing.do_bench needs a GPU)."""
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _bench_rows(gpu, bw, cases):
    """cases: (label, min bytes, f). Static facts from recording f's launches and compiling them for sm_90."""
    launches = [(str(i), *g) for i, (_, _, f) in enumerate(cases) for g in _recorded(f)]
    facts = [[] for _ in cases]
    for r in compile_report(launches, caps=(90,)):
        for i in r["labels"]:
            facts[int(i)].append(f"{r['kernel']}: {_facts_str(r)}")
    print("| configuration | sm_90: registers / spills / smem | min MB | roofline us | graph us | eager us "
          "| % roofline |")
    print("|---|---|---|---|---|---|---|")
    for (label, nbytes, f), fa in zip(cases, facts):
        roof = nbytes / bw * 1e6
        cells = ["-", "-", "-"]
        if gpu:
            tg = triton.testing.do_bench_cudagraph(f) * 1e3
            te = triton.testing.do_bench(f, return_mode="median") * 1e3
            cells = [f"{tg:.1f}", f"{te:.1f}", f"{100 * roof / tg:.0f}%"]
        print(f"| {label} | {'; '.join(fa) or 'reference (no Triton launch)'} | {nbytes / 1e6:.2f} | {roof:.1f} | "
              + " | ".join(cells) + " |")


def _l2_bytes(kernel, args, meta):
    """Bytes a transform launch moves through L2 by the model behind butterfly()'s rule, in 32-byte sectors: its
    rows in and out, what its programs re-read (cos/sin per shuffle program, the blocks per stream tile), and the
    stream kernel's intermediate, written by pass 1 and read and rewritten by pass 2 in runs of LO values."""
    x, e = args[0], args[0].element_size()
    if kernel is _transform_kernel:                     # x, y, cos, sin, ...
        programs = x.shape[0] if meta["HAS_Q"] else triton.cdiv(x.shape[0], meta["KP"])
        return 2 * x.numel() * e + programs * 2 * args[2].numel() * 4
    assert kernel is _bfly_stream_kernel                # x, y, W0, W1, q, NTILES, ...
    over = max(1, 32 // (meta["LO"] * e))               # pass 2: a run of LO values moves a whole 32-byte sector
    return x.numel() * e * (2 + 2 * over) + args[5] * (args[2].numel() + args[3].numel()) * args[2].element_size()


def bench():
    gpu = torch.cuda.is_available() and HAVE_TRITON
    dev = "cuda" if gpu else "meta"         # with no GPU, configurations are recorded and compiled, not run
    if gpu:
        big = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
        bw = 2 * big.numel() / (triton.testing.do_bench_cudagraph(lambda: big.clone()) * 1e-3)
        print(f"# kernels.py --bench on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{triton.__version__}; copy bandwidth (clone of 256 MiB) {bw / 1e9:.0f} GB/s")
        print("# graph: triton.testing.do_bench_cudagraph (no launch overhead); eager: do_bench, median")
    else:
        bw = H100_COPY_GBS * 1e9
        print(f"# kernels.py --bench with no GPU: static facts (sm_90) and the roofline at the README's H100 copy "
              f"bandwidth, {H100_COPY_GBS} GB/s; nothing timed")
    dt = torch.float16
    print("\n## transform T x, fp16\n")
    cases = []
    for n in NS:
        K, m = bq.kron_split(n)
        L = m.bit_length() - 1
        th = (torch.rand(L, m // 2, device=dev) * 6.28) if gpu else torch.empty(L, m // 2, device=dev)
        c, s = th.cos(), th.sin()
        Q = torch.linalg.qr(torch.randn(K, K))[0].to(dev) if K > 1 and gpu else (
            torch.empty(K, K, device=dev) if K > 1 else None)
        for rows in (1, 16, 4096, 8192):
            x = torch.randn(rows, n, device=dev, dtype=dt)
            nbytes = 2 * x.numel() * 2 + 2 * c.numel() * 4 + (K * K * 4 if K > 1 else 0)
            cases.append((f"n = {n} ({K} x {m}), {rows} rows", nbytes, functools.partial(butterfly, x, c, s, Q)))
    _bench_rows(gpu, bw, cases)
    print("\n## n = 4096, fp16: stream kernel (the default) against shuffle kernel\n")
    print("min MB: rows in and out, and the kernel's parameters read once from HBM (the blocks, or cos/sin). "
          "L2 MB (_l2_bytes, the model behind the rule): the rows, plus what each program re-reads from L2 (the "
          "blocks per 32-row tile, or cos/sin per 2-row program), plus the stream kernel's intermediate, written to "
          "L2 and read back.\n")
    th = torch.rand(12, 2048, device=dev) * 6.28 if gpu else torch.empty(12, 2048, device=dev)
    c, s = th.cos(), th.sin()
    cases = []
    for rows in (16, 4096, 8192):
        x = torch.randn(rows, 4096, device=dev, dtype=dt)
        for name, f in (("stream", functools.partial(_launch_blocks, x, c, s, None)),
                        ("shuffle", functools.partial(_launch_transform, x, c, s, None, False))):
            (kernel, args, meta), = _recorded(f)
            params = args[2:4] if kernel is _bfly_stream_kernel else (c, s)
            cases.append((f"{name}, {rows} rows, L2 {_l2_bytes(kernel, args, meta) / 1e6:.0f} MB",
                          2 * x.numel() * 2 + sum(p.numel() * p.element_size() for p in params), f))
    _bench_rows(gpu, bw, cases)
    print("\n## shuffle kernel, n = 4096, 8192 rows, fp16: rows per program (the dispatch uses "
          f"{ROWS_PER_PROGRAM})\n")
    x, keep = torch.randn(8192, 4096, device=dev, dtype=dt), ROWS_PER_PROGRAM
    th = torch.rand(12, 2048, device=dev) * 6.28 if gpu else torch.empty(12, 2048, device=dev)
    c, s = th.cos(), th.sin()

    def with_rows(kp):
        global ROWS_PER_PROGRAM
        ROWS_PER_PROGRAM = kp
        try:
            return _launch_transform(x, c, s, None, False)
        finally:
            ROWS_PER_PROGRAM = keep
    _bench_rows(gpu, bw, [(f"{kp} rows per program", 2 * x.numel() * 2 + 2 * c.numel() * 4,
                           functools.partial(with_rows, kp)) for kp in (1, 2, 4, 8, 16)])
    print("\n## packed matmul y = x @ dequant(Wq)^T, g128, fp16 x\n")
    cases = []
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 1536)):
        for bits in (2, 4):
            G = bq.ngroups(in_f, 128)
            if gpu:
                q, sc, z = bq.quantize(torch.randn(out_f, in_f), bq.QuantConfig(bits, 128, clip=False))
                args = (bq.pack(q, bits).to(dev), sc.half().to(dev), z.half().to(dev), bits, 128, out_f, in_f)
            else:
                args = (torch.empty(out_f * in_f * bits // 32, dtype=torch.int32, device=dev),
                        torch.empty(out_f, G, dtype=dt, device=dev), torch.empty(out_f, G, dtype=dt, device=dev),
                        bits, 128, out_f, in_f)
            for rows in (1, 16, 64, 2048):
                x = torch.randn(rows, in_f, device=dev, dtype=dt)
                nbytes = (x.numel() + rows * out_f) * 2 + args[0].numel() * 4 + 2 * out_f * G * 2
                cases.append((f"{out_f} x {in_f}, W{bits}, {rows} rows", nbytes, functools.partial(qmatmul, x, *args)))
        if gpu:
            W = torch.randn(out_f, in_f, device=dev, dtype=dt)
            for rows in (1, 16):
                x = torch.randn(rows, in_f, device=dev, dtype=dt)
                cases.append((f"{out_f} x {in_f}, fp16 torch.matmul, {rows} rows",
                              (W.numel() + x.numel() + rows * out_f) * 2, functools.partial(torch.matmul, x, W.T)))
    _bench_rows(gpu, bw, cases)
    print("\n## CPU: PyTorch reference butterfly vs a dense matmul, fp32, median of 3 (time.perf_counter)\n")
    torch.manual_seed(0)
    x, bf, Md = torch.randn(4096, 4096), bq.Butterfly(4096, "random"), torch.randn(4096, 4096)
    with torch.no_grad():
        tb, td = _median_s(lambda: bf(x), 3), _median_s(lambda: x @ Md.T, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, x (4096, 4096): Butterfly(4096) "
          f"{tb * 1e3:.1f} ms ({bf.theta.numel()} angles), dense 4096 x 4096 matmul {td * 1e3:.1f} ms ({td / tb:.1f}x)")


# -----------------------------------------------------------------------------
# experimental (off by default): the Triton backward of the transform (switch: call transform_triton; calibration
# learns with the PyTorch reference) and the decode GEMV with the input transform fused in (switch: BQ_FUSE_ROWS,
# with llama.fuse_transforms). Both exact under the interpreter, neither timed. `--compile --experimental`: the
# fused GEMV compiles without spills wherever the dispatch can pick it; the backward spills with a 64-segment Q in
# fp32 (n = 576: 80 bytes, n = 11008: 32 KB; its "ieee" Q dot runs on FMA units), which is why no path runs it.

FUSE_ROWS = int(os.environ.get("BQ_FUSE_ROWS", "0"))     # decode rows up to which a fused-in transform runs
# inside the GEMV kernel (at most 16); 0: off.

if HAVE_TRITON:
    @triton.jit
    def _stage_bwd(y, g, dtheta_ptr, cos_ptr, sin_ptr, i: tl.constexpr, KP: tl.constexpr, M: tl.constexpr):
        """Stage i backwards: dtheta += sum(g_b a' - g_a b'), then S^T = [[c, s], [-s, c]] on output and grad."""
        S: tl.constexpr = 1 << i
        NB: tl.constexpr = M // (2 * S)
        poffs = tl.arange(0, NB)[:, None] * S + tl.arange(0, S)[None, :]
        c = tl.load(cos_ptr + i * (M // 2) + poffs)
        s = tl.load(sin_ptr + i * (M // 2) + poffs)
        ya, yb = tl.split(tl.permute(tl.reshape(y, (KP, NB, 2, S)), (0, 1, 3, 2)))
        ga, gb = tl.split(tl.permute(tl.reshape(g, (KP, NB, 2, S)), (0, 1, 3, 2)))
        tl.atomic_add(dtheta_ptr + i * (M // 2) + poffs, tl.sum(gb * ya - ga * yb, axis=0))
        y = tl.reshape(tl.permute(tl.join(c[None] * ya + s[None] * yb, c[None] * yb - s[None] * ya),
                                  (0, 1, 3, 2)), (KP, M))
        g = tl.reshape(tl.permute(tl.join(c[None] * ga + s[None] * gb, c[None] * gb - s[None] * ga),
                                  (0, 1, 3, 2)), (KP, M))
        return y, g

    @triton.jit
    def _transform_bwd_kernel(y_ptr, g_ptr, gx_ptr, gu_ptr, dtheta_ptr, cos_ptr, sin_ptr, q_ptr,
                              stride_qi, stride_qj, K: tl.constexpr, KP: tl.constexpr, M: tl.constexpr,
                              LOG_M: tl.constexpr, HAS_Q: tl.constexpr):
        """Backward of y = B (Q x) from the output alone: walking the stages backwards, a stage's input is
        S^T of its output, and d out / d theta for a pair (a', b') is (-b', a'), so
        dtheta = sum over rows of (b_grad * a' - a_grad * b'). Writes dx, the gradient at Q's output (for dQ),
        and adds dtheta atomically."""
        row = tl.program_id(0).to(tl.int64)
        seg = tl.arange(0, KP)
        offs = seg[:, None] * M + tl.arange(0, M)[None, :]
        mask = seg[:, None] < K
        y = tl.load(y_ptr + row * K * M + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * K * M + offs, mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(LOG_M - 1, -1, -1):
            y, g = _stage_bwd(y, g, dtheta_ptr, cos_ptr, sin_ptr, i, KP, M)
        if HAS_Q:
            tl.store(gu_ptr + row * K * M + offs, g, mask=mask)
            qmask = (seg[:, None] < K) & (seg[None, :] < K)
            qt = tl.load(q_ptr + seg[None, :] * stride_qi + seg[:, None] * stride_qj, mask=qmask, other=0.0)
            g = tl.dot(qt, g, input_precision="ieee")
        tl.store(gx_ptr + row * K * M + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["M", "G"])
    def _decode_fused_kernel(x_ptr, t_ptr, cos_ptr, sin_ptr, q_ptr, stride_qi, stride_qj, w_ptr, s_ptr, z_ptr,
                             y_ptr, M, OUT, IN, G, K: tl.constexpr, KP: tl.constexpr, SEG: tl.constexpr,
                             LOG_SEG: tl.constexpr, HAS_Q: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                             ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT: tl.constexpr):
        """y (M, BLOCK_N tile) = (T x) @ dequant(W tile)^T for decode (M <= 16 rows), in one launch. T x is
        needed whole by every program (the butterfly mixes all of a row), so each program transforms the few
        rows itself into its own scratch rows t[pid] (fp32, stays in L2) and reads them back by K-tile: redundant
        arithmetic traded for one launch instead of four (transform, zero fill, split-K GEMV, cast)."""
        pid = tl.program_id(0)
        seg = tl.arange(0, KP)
        offs = seg[:, None] * SEG + tl.arange(0, SEG)[None, :]                  # (KP, SEG): row = K segments
        smask = seg[:, None] < K
        t_base = t_ptr + pid.to(tl.int64) * M * IN
        if HAS_Q:       # loaded once, used for every row
            qm = tl.load(q_ptr + seg[:, None] * stride_qi + seg[None, :] * stride_qj,
                         mask=(seg[:, None] < K) & (seg[None, :] < K), other=0.0)
        for r in range(M):
            v = tl.load(x_ptr + r * IN + offs, mask=smask, other=0.0).to(tl.float32)
            if HAS_Q:
                v = tl.dot(qm, v, input_precision="ieee" if DOT == "ieee" else "tf32")
            v = _stages(v, cos_ptr, sin_ptr, KP, SEG, LOG_SEG, False)
            tl.store(t_base + r * IN + offs, v, mask=smask)
        tl.debug_barrier()          # this program's scratch rows are written before any thread reads them
        rm = tl.arange(0, 16)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(t_base + rm[:, None] * IN + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < IN),
                         other=0.0)
            w = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, k0, OUT, IN, G, GROUP, BITS, ALIGNED, BLOCK_N, BLOCK_K)
            if DOT == "fp16":       # as the unfused path: T x rounded to fp16, then the fp16 dot
                acc += tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)))
            elif DOT == "tf32":     # bf16 x: T x rounded to bf16 first, as the unfused path stores it
                acc += tl.dot(xt.to(tl.bfloat16).to(tl.float32), tl.trans(w), input_precision="tf32")
            else:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        tl.store(y_ptr + rm[:, None].to(tl.int64) * OUT + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < OUT))


def _launch_transform_bwd(y, gy, cos, sin, Q, theta_shape):
    """-> (dx, gradient at Q's output or None, dtheta) for y = B (Q x), from the output y alone."""
    n = y.shape[-1]
    K = 1 if Q is None else Q.shape[0]
    m = n // K
    yf, gf = y.reshape(-1, n).contiguous(), gy.reshape(-1, n).contiguous()
    gx = torch.empty_like(yf)
    gu = torch.empty(yf.shape, device=y.device, dtype=torch.float32) if Q is not None else gx
    dtheta = torch.zeros(theta_shape, device=y.device, dtype=torch.float32)
    q = Q.float().contiguous() if Q is not None else cos
    _launch(_transform_bwd_kernel, (yf.shape[0],), yf, gf, gx, gu, dtheta, cos, sin, q,
            q.stride(0) if Q is not None else 0, q.stride(1) if Q is not None else 0,
            K=K, KP=_kp(K), M=m, LOG_M=m.bit_length() - 1, HAS_Q=Q is not None,
            num_warps=4 if n <= 2048 else 8)
    return gx, (gu if Q is not None else None), dtheta


class _TransformFn(torch.autograd.Function):
    """y = (Q (x) B(theta)) x with Triton forward and backward (d x, d theta, d Q)."""

    @staticmethod
    def forward(ctx, x, theta, Q):
        cos, sin = theta.cos().float().contiguous(), theta.sin().float().contiguous()
        y = _launch_transform(x, cos, sin, Q, False)
        ctx.save_for_backward(x, y, theta, cos, sin, Q)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, y, theta, cos, sin, Q = ctx.saved_tensors
        gx, gu, dtheta = _launch_transform_bwd(y, gy, cos, sin, Q, theta.shape)
        dQ = None
        if Q is not None:   # dQ_ij = sum over rows and positions of gu[i, t] x[j, t]
            K = Q.shape[0]
            xs = x.reshape(-1, K, x.shape[-1] // K).float()
            dQ = torch.einsum("rit,rjt->ij", gu.view(-1, K, xs.shape[-1]), xs).to(Q.dtype)
        return gx.view(x.shape), dtheta.to(theta.dtype), dQ


def transform_triton(x, theta, Q=None):
    """Differentiable fused T x on the last dim (fp32/fp16/bf16; computed in fp32)."""
    return _TransformFn.apply(x, theta, Q)


def qmatmul_transformed_triton(x, cos, sin, Q, words, scales, zeros, bits, group, out_features, in_features):
    """y = (T x) @ dequant(Wq)^T for decode rows (M <= 16) with the transform fused in (see the kernel)."""
    x = x.contiguous()
    M, n = x.shape
    K = 1 if Q is None else Q.shape[0]
    m = n // K
    BN, BK = 32, 32             # BLOCK_K = 128 spills in fp32 and at 3 bits (`--compile --experimental`)
    grid = triton.cdiv(out_features, BN)
    t = torch.empty(grid, M, n, device=x.device, dtype=torch.float32)      # per-program scratch
    y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
    q = Q.float().contiguous() if Q is not None else cos
    _launch(_decode_fused_kernel, (grid,),
        x, t, cos.float().contiguous(), sin.float().contiguous(), q, q.stride(0) if Q is not None else 0,
        q.stride(1) if Q is not None else 0, words, scales, zeros, y, M, out_features, in_features, scales.shape[1],
        K=K, KP=_kp(K), SEG=m, LOG_SEG=m.bit_length() - 1, HAS_Q=Q is not None,
        GROUP=in_features if group == 0 else group, BITS=bits, ALIGNED=_aligned(bits, in_features), BLOCK_N=BN,
        BLOCK_K=BK, DOT=_dot_mode(x.dtype), num_warps=4 if n * _kp(K) <= 4096 else 8)
    return y


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Static checks and benchmarks of the inference kernels.")
    p.add_argument("--compile", action="store_true", help="compile every dispatch configuration for sm_90, sm_80")
    p.add_argument("--json", help="with --compile: write the rows here")
    p.add_argument("--experimental", action="store_true", help="with --compile: the experimental kernels too")
    p.add_argument("--bench", action="store_true")
    a = p.parse_args()
    if a.compile:
        raise SystemExit(0 if compile_main(a.json, a.experimental) else 1)
    if a.bench:
        bench()
    else:
        p.print_help()
