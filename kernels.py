"""
Inference kernels for ButterflyQuant models: the online transform T x and the packed low-bit matmul
y = x @ dequant(Wq)^T. Each Triton kernel sits beside its PyTorch reference; `butterfly()` and `qmatmul()`
dispatch in one place: Triton on CUDA tensors, the references everywhere else (CPU, or no Triton).
The matmul has three regimes by row count (split-K decode GEMV, fused dequant-GEMM, dequantize-then-cuBLAS
prefill) and a decode GEMV with the input transform fused in (FUSE_ROWS; off until a GPU run shows it pays).

Packed weights (see butterflyquant.pack): one little-endian bit stream per matrix, row after row, `bits` bits
per value in int32 words; fp16 scale and zero per (row, group of g input columns); w = s * (q - z).

    python kernels.py --bench         # GB/s, times vs dense matmul and fp16 GEMV (needs a GPU for the kernels)
"""
import argparse
import functools
import os

import torch
import torch.nn as nn

import butterflyquant as bq

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:     # the references still run
    HAVE_TRITON = False


def use_triton(x):
    """Kernels on CUDA tensors. (Tests call the Triton entry points directly on CPU under TRITON_INTERPRET=1.)"""
    return HAVE_TRITON and x.is_cuda


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
# Triton: fused transform. One program per row: the row is read once, Q mixes its K segments (tl.dot), then all
# log2(m) butterfly stages run in registers, and the row is written once. Q (x) B = (I (x) B)(Q (x) I).

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

    @triton.jit
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


# Pure butterflies: rows per program. Every program loads all L x n/2 cos/sin pairs (fp32), i.e. L / ROWS times
# the bytes of its fp16 rows read and written: 6x at L = 12 and 2 rows. More rows cut that traffic but hold
# more registers; `--bench` sweeps it (2 is untuned: the README's H100 table used it).
ROWS_PER_PROGRAM = int(os.environ.get("BQ_BFLY_ROWS", "2"))


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
    kp = _kp(K) if Q is not None else ROWS_PER_PROGRAM
    if R:
        grid = (R if Q is not None else triton.cdiv(R, kp),)
        _transform_kernel[grid](xf, y, cos.float().contiguous(), sin.float().contiguous(), q,
                                q.stride(0) if Q is not None else 0, q.stride(1) if Q is not None else 0, R,
                                K=K, KP=kp, M=m, LOG_M=m.bit_length() - 1, HAS_Q=Q is not None,
                                TRANSPOSE=transpose, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                num_warps=4 if n * kp <= 4096 else 8 if n * kp <= 16384 else 16)
    return y.view(x.shape)


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
        n = x.shape[-1]
        K = 1 if Q is None else Q.shape[0]
        m = n // K
        yf, gf = y.reshape(-1, n).contiguous(), gy.reshape(-1, n).contiguous()
        gx = torch.empty_like(yf)
        gu = torch.empty(yf.shape, device=y.device, dtype=torch.float32) if Q is not None else gx
        dtheta = torch.zeros(theta.shape, device=y.device, dtype=torch.float32)
        q = Q.float().contiguous() if Q is not None else cos
        _transform_bwd_kernel[(yf.shape[0],)](yf, gf, gx, gu, dtheta, cos, sin, q,
                                              q.stride(0) if Q is not None else 0, q.stride(1) if Q is not None else 0,
                                              K=K, KP=_kp(K), M=m, LOG_M=m.bit_length() - 1, HAS_Q=Q is not None,
                                              num_warps=4 if n <= 2048 else 8)
        dQ = None
        if Q is not None:   # dQ_ij = sum over rows and positions of gu[i, t] x[j, t]
            xs = x.reshape(-1, K, m).float()
            dQ = torch.einsum("rit,rjt->ij", gu.view(-1, K, m), xs).to(Q.dtype)
        return gx.view(x.shape), dtheta.to(theta.dtype), dQ


def transform_triton(x, theta, Q=None):
    """Differentiable fused T x on the last dim (fp32/fp16/bf16; computed in fp32)."""
    return _TransformFn.apply(x, theta, Q)


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

    @triton.jit
    def _qmatmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, OUT, IN, G, K_PER_SPLIT, GROUP: tl.constexpr,
                        BITS: tl.constexpr, ALIGNED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        """y tile (BLOCK_M, BLOCK_N) = x tile @ dequant(W tile)^T over columns [pid_k, pid_k + 1) * K_PER_SPLIT.
        Decode (M <= 16): BLOCK_M = 16, narrow BLOCK_N, and split-K (SPLIT > 1 programs per tile, summed with
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
            if DOT == "fp16":
                acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
            else:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=DOT)
        ptrs = y_ptr + rm[:, None].to(tl.int64) * OUT + rn[None, :]
        ymask = (rm[:, None] < M) & (rn[None, :] < OUT)
        if SPLIT > 1:
            tl.atomic_add(ptrs, acc, mask=ymask)        # y is fp32 and zeroed: the splits' partial sums
        else:
            tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, OUT, IN, G, GROUP: tl.constexpr, BITS: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out (OUT, IN) = s * (q - z), one (BLOCK_N, BLOCK_K) tile per program."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, k0, OUT, IN, G, GROUP, BITS, ALIGNED, BLOCK_N, BLOCK_K)
        tl.store(out_ptr + rn[:, None].to(tl.int64) * IN + rk[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(rn[:, None] < OUT) & (rk[None, :] < IN))

    @triton.jit
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
    _dequant_kernel[(triton.cdiv(out_features, BN), triton.cdiv(in_features, BK))](
        words, scales, zeros, out, out_features, in_features, scales.shape[1],
        GROUP=in_features if group == 0 else group, BITS=bits, ALIGNED=_aligned(bits, in_features),
        BLOCK_N=BN, BLOCK_K=BK, num_warps=4)
    return out


PREFILL_ROWS = int(os.environ.get("BQ_PREFILL_ROWS", "256"))    # from here on: dequantize, then cuBLAS


def qmatmul_triton(x, words, scales, zeros, bits, group, out_features, in_features):
    """Three regimes. Decode (<= 16 rows): split-K GEMV, bound by reading the packed weights. Middle: the fused
    dequant-GEMM. Prefill (>= PREFILL_ROWS rows): the fused kernel would dequantize every weight tile once per
    block of rows, so dequantize once (one pass, ~out*in*2 bytes written) and let cuBLAS do the GEMM; the H100
    table had the fused kernel 7x behind fp16 cuBLAS at 2048 rows."""
    x = x.contiguous()
    M = x.shape[0]
    if M >= PREFILL_ROWS:
        return x @ dequant_triton(words, scales, zeros, bits, group, out_features, in_features, x.dtype).T
    g = in_features if group == 0 else group
    if M <= 16:
        BM, BN, BK, warps = 16, 32, 128, 4
    elif M <= 64:
        BM, BN, BK, warps = 64, 64, 64, 4
    else:
        BM, BN, BK, warps = 128, 128, 64, 8
    tiles = triton.cdiv(M, BM) * triton.cdiv(out_features, BN)
    k_tiles = triton.cdiv(in_features, BK)
    split = 1
    if M <= 16:             # split K until the grid fills the device
        split = max(1, min(k_tiles, triton.cdiv(_programs_wanted(x.device), tiles)))
    per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per_split)     # no empty splits
    y = (torch.zeros if split > 1 else torch.empty)(M, out_features, device=x.device,
                                                    dtype=torch.float32 if split > 1 else x.dtype)
    _qmatmul_kernel[(triton.cdiv(M, BM), triton.cdiv(out_features, BN), split)](
        x, words, scales, zeros, y, M, out_features, in_features, scales.shape[1], per_split * BK, GROUP=g,
        BITS=bits, ALIGNED=_aligned(bits, in_features), SPLIT=split, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        DOT=_dot_mode(x.dtype), num_warps=warps, num_stages=3)
    return y.to(x.dtype)


def qmatmul_transformed_triton(x, cos, sin, Q, words, scales, zeros, bits, group, out_features, in_features):
    """y = (T x) @ dequant(Wq)^T for decode rows (M <= 16) with the transform fused in (see the kernel)."""
    x = x.contiguous()
    M, n = x.shape
    K = 1 if Q is None else Q.shape[0]
    m = n // K
    BN, BK = 32, 128
    grid = triton.cdiv(out_features, BN)
    t = torch.empty(grid, M, n, device=x.device, dtype=torch.float32)      # per-program scratch
    y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
    q = Q.float().contiguous() if Q is not None else cos
    _decode_fused_kernel[(grid,)](
        x, t, cos.float().contiguous(), sin.float().contiguous(), q, q.stride(0) if Q is not None else 0,
        q.stride(1) if Q is not None else 0, words, scales, zeros, y, M, out_features, in_features, scales.shape[1],
        K=K, KP=_kp(K), SEG=m, LOG_SEG=m.bit_length() - 1, HAS_Q=Q is not None,
        GROUP=in_features if group == 0 else group, BITS=bits, ALIGNED=_aligned(bits, in_features), BLOCK_N=BN,
        BLOCK_K=BK, DOT=_dot_mode(x.dtype), num_warps=4 if n * _kp(K) <= 4096 else 8)
    return y


# -----------------------------------------------------------------------------
# dispatch: the one place that picks Triton or the reference

def _transform_supported(x, Q):
    K = 1 if Q is None else Q.shape[0]
    m = x.shape[-1] // K
    return use_triton(x) and (Q is None or (m >= 16 and K <= 128)) and m >= 2


def butterfly(x, cos, sin, Q=None):
    """T x for the online transform (inference; no gradient)."""
    if _transform_supported(x, Q):
        return _launch_transform(x, cos.float().contiguous(), sin.float().contiguous(), Q, False)
    return transform_ref(x, cos, sin, Q)


FUSE_ROWS = int(os.environ.get("BQ_FUSE_ROWS", "0"))     # decode rows up to which a fused-in transform runs
# inside the GEMV kernel (at most 16). 0 (off) until a GPU run of `--bench` shows where it pays: it is exact
# (tested under the interpreter) but has never been timed.


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
        if n < 1 or K < 1 or K * m != n or not bq.is_pow2(m) or (not dense and m < 2):
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
# benchmark:  python kernels.py --bench

def _time(f, reps=20):
    """Eager seconds per call of f: on a GPU this includes Python and launch overhead, which at small sizes may
    be all there is to measure (in the README's H100 table the transform is flat at ~0.08 ms from 1 to 4096
    rows)."""
    f()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3
    import time
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps


def _time_graph(f, calls=20, replays=5):
    """GPU seconds per call of f alone: `calls` calls captured in one CUDA graph and replayed, so the host-side
    overhead drops out. This is the number the bandwidth figures use."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):       # warm-up off the capture: compiles the kernels, settles the allocator
        f(), f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            f()
    return _time(g.replay, replays) / calls


def bench():
    gpu = torch.cuda.is_available() and HAVE_TRITON
    dev = "cuda" if gpu else "cpu"
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# kernels.py --bench on {name}, torch {torch.__version__}" + ("" if gpu else
          "\n# no GPU: the Triton kernels need one; timing the PyTorch references only"))
    print("# kernel / graph: GPU time from a CUDA graph replay; eager: one Python call, launch overhead included")
    dt = torch.float16 if gpu else torch.float32
    if gpu:
        big = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
        copy_bw = 2 * big.numel() / _time_graph(lambda: big.clone(), calls=5)
        print(f"device copy bandwidth (clone of 256 MiB): {copy_bw / 1e9:.0f} GB/s")
    print(f"\n## fused transform T x ({'fp16' if gpu else 'fp32'} in/out)\n")
    print("| n | rows | kernel ms | GB/s | % copy | eager ms | dense n x n matmul ms (graph) | PyTorch reference ms |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (4096, 11008):
        T = bq.Transform(n, "random")
        th = T.butterfly.theta.detach().to(dev)
        Q = T.q().detach().to(dev) if T.K > 1 else None
        c, s = th.cos(), th.sin()
        Md = torch.randn(n, n, device=dev, dtype=dt)
        for rows in ((1, 16, 64, 512, 4096, 8192) if gpu else (64, 512)):
            x = torch.randn(rows, n, device=dev, dtype=dt)
            tr = _time(lambda: transform_ref(x, c, s, Q), reps=5 if not gpu else 20)
            if gpu:
                td = _time_graph(lambda: x @ Md.T)
                tk, te = _time_graph(lambda: butterfly(x, c, s, Q)), _time(lambda: butterfly(x, c, s, Q))
                gbs = 2 * x.numel() * x.element_size() / tk
                print(f"| {n} | {rows} | {tk * 1e3:.4f} | {gbs / 1e9:.0f} | {100 * gbs / copy_bw:.0f}% | "
                      f"{te * 1e3:.4f} | {td * 1e3:.4f} | {tr * 1e3:.3f} |")
            else:
                td = _time(lambda: x @ Md.T, reps=5)
                print(f"| {n} | {rows} | - | - | - | - | {td * 1e3:.3f} (eager) | {tr * 1e3:.3f} |")
    print(f"\n## packed matmul y = x @ dequant(Wq)^T vs {'fp16' if gpu else 'fp32'} torch.matmul (W2 and W4, g128)\n")
    print("| out x in | rows | bits | kernel ms | eager ms | fp16 matmul ms (graph) | speedup (graph) | packed GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
        W = torch.randn(out_f, in_f)
        for bits in (2, 4):
            q, sc, z = bq.quantize(W, bq.QuantConfig(bits, 128, clip=False))
            args = (bq.pack(q, bits).to(dev), sc.half().to(dev), z.half().to(dev), bits, 128, out_f, in_f)
            Wh = W.to(dev, dt)
            for rows in ((1, 16, 64, 2048) if gpu else (1, 16)):
                x = torch.randn(rows, in_f, device=dev, dtype=dt)
                if gpu:
                    tf = _time_graph(lambda: x @ Wh.T)
                    tk, te = _time_graph(lambda: qmatmul(x, *args)), _time(lambda: qmatmul(x, *args))
                    nbytes = args[0].numel() * 4 + args[1].numel() * 4 + x.numel() * 2 + rows * out_f * 2
                    print(f"| {out_f}x{in_f} | {rows} | {bits} | {tk * 1e3:.4f} | {te * 1e3:.4f} | {tf * 1e3:.4f} | "
                          f"{tf / tk:.2f}x | {nbytes / tk / 1e9:.0f} |")
                else:
                    tf = _time(lambda: x @ Wh.T)
                    tk = _time(lambda: qmatmul_ref(x, *args), reps=3)
                    print(f"| {out_f}x{in_f} | {rows} | {bits} | ref {tk * 1e3:.1f} | - | {tf * 1e3:.3f} (eager) | "
                          f"{tf / tk:.2f}x | - |")
    if gpu:
        rows_per_program_bench(dev, copy_bw)
        fused_bench(dev)
        decode_bench(dev)


def rows_per_program_bench(dev, copy_bw, n=4096, rows=8192):
    """The fused transform's one tuning knob, ROWS_PER_PROGRAM (angle traffic vs registers)."""
    global ROWS_PER_PROGRAM
    keep = ROWS_PER_PROGRAM
    th = bq.Transform(n, "random").butterfly.theta.detach().to(dev)
    c, s = th.cos(), th.sin()
    x = torch.randn(rows, n, device=dev, dtype=torch.float16)
    print(f"\n## fused transform, n = {n}, {rows} rows, fp16: rows per program (BQ_BFLY_ROWS)\n")
    print("| rows per program | kernel ms | % copy |")
    print("|---|---|---|")
    for kp in (1, 2, 4, 8, 16):
        ROWS_PER_PROGRAM = kp
        tk = _time_graph(lambda: butterfly(x, c, s))
        print(f"| {kp} | {tk * 1e3:.4f} | {100 * 4 * x.numel() / tk / copy_bw:.0f}% |")
    ROWS_PER_PROGRAM = keep


def fused_bench(dev, shapes=((4096, 4096), (11008, 4096), (4096, 11008))):
    """Decode with the input butterfly: transform then GEMV (4 launches) vs the fused kernel (1 launch)."""
    print("\n## decode (T x) @ dequant(W2 g128)^T: transform then GEMV vs fused, fp16\n")
    print("| out x in | rows | separate ms (graph) | fused ms (graph) | separate eager ms | fused eager ms |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        T = bq.Transform(in_f, "random")
        th = T.butterfly.theta.detach().to(dev)
        c, s = th.cos(), th.sin()
        Q = T.q().detach().to(dev) if T.K > 1 else None
        q, sc, z = bq.quantize(torch.randn(out_f, in_f), bq.QuantConfig(2, 128, clip=False))
        args = (bq.pack(q, 2).to(dev), sc.half().to(dev), z.half().to(dev), 2, 128, out_f, in_f)
        for rows in (1, 16):
            x = torch.randn(rows, in_f, device=dev, dtype=torch.float16)
            sep = lambda: qmatmul(butterfly(x, c, s, Q), *args)                   # noqa: E731
            fus = lambda: qmatmul_transformed_triton(x, c, s, Q, *args)           # noqa: E731
            print(f"| {out_f}x{in_f} | {rows} | {_time_graph(sep) * 1e3:.4f} | {_time_graph(fus) * 1e3:.4f} | "
                  f"{_time(sep) * 1e3:.4f} | {_time(fus) * 1e3:.4f} |")


def decode_bench(dev, tokens=128, n_layers=30):
    """End-to-end greedy decode tokens/s at SmolLM2-135M's shapes (random weights: speed does not depend on
    them; the real file does not fit the device tool's transfer limit): fp16 vs W2 g128 packed with a learned-
    shape butterfly transform at every site."""
    import time
    import llama
    args = llama.ModelArgs(dim=576, n_layers=n_layers, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                           rope_theta=1e5, tie_embeddings=True, max_seq_len=2048)
    torch.manual_seed(0)
    fp = llama.Transformer(args).to(dev, torch.float16).eval()
    q = llama.Transformer(args).eval()
    q.load_state_dict({k: v.float().cpu() for k, v in fp.state_dict().items()})

    def to_quant(name, lin):
        ql = QuantLinear(lin.in_features, lin.out_features, 2, 128)
        qq, s, z = bq.quantize(lin.weight.detach(), bq.QuantConfig(2, 128, clip=False))
        ql.qweight.copy_(bq.pack(qq, 2))
        ql.scales.copy_(s.half())
        ql.zeros.copy_(z.half())
        return ql
    llama.swap_linears(q, to_quant)
    for block in q.layers:
        for parent, slot, n in (("attention", "rot_qkv", 576), ("attention", "rot_o", 576),
                                ("feed_forward", "rot_up", 576), ("feed_forward", "rot_down", 1536)):
            T = bq.Transform(n, "random")
            t = OnlineTransform(n, T.K, T.m)
            t.theta.copy_(T.butterfly.theta.detach())
            if T.K > 1:
                t.Q.copy_(T.q().detach())
            setattr(getattr(block, parent), slot, t)
    q.to(dev, torch.float16)
    import copy
    qf = llama.fuse_transforms(copy.deepcopy(q))
    print("\n## end-to-end decode, SmolLM2-135M shapes (random weights), greedy, batch 1, KV cache, eager\n")
    global FUSE_ROWS
    for label, model, fuse in (("fp16", fp, 0), ("W2 g128 packed + butterflies", q, 0),
                               ("W2 g128 packed + butterflies, rot_o/rot_down fused into the GEMV", qf, 16)):
        FUSE_ROWS = fuse
        ids = list(range(1, 17))
        model.generate(ids, 8, temperature=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, tokens, temperature=0)
        torch.cuda.synchronize()
        print(f"{label}: {len(out) / (time.perf_counter() - t0):.1f} tokens/s")
    FUSE_ROWS = 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Benchmarks of the inference kernels.")
    p.add_argument("--bench", action="store_true")
    if p.parse_args().bench:
        bench()
    else:
        p.print_help()
