"""
Inference kernels for ButterflyQuant models: the online transform T x and the packed low-bit matmul
y = x @ dequant(Wq)^T. Each Triton kernel sits beside its PyTorch reference; `butterfly()` and `qmatmul()`
dispatch in one place: Triton on CUDA tensors, the references everywhere else (CPU, or no Triton).

Packed weights (see butterflyquant.pack): one little-endian bit stream per matrix, row after row, `bits` bits
per value in int32 words; fp16 scale and zero per (row, group of g input columns); w = s * (q - z).

    python kernels.py --bench         # GB/s, times vs dense matmul and fp16 GEMV (needs a GPU for the kernels)
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn

import butterflyquant as bq

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:     # the references still run
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x):
    return HAVE_TRITON and (x.is_cuda or INTERPRET)


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
# dispatch

def butterfly(x, cos, sin, Q=None):
    return transform_ref(x, cos, sin, Q)


def qmatmul(x, words, scales, zeros, bits, group, out_features, in_features):
    return qmatmul_ref(x, words, scales, zeros, bits, group, out_features, in_features)


# -----------------------------------------------------------------------------
# modules that llama.py swaps in

class QuantLinear(nn.Module):
    """y = x @ (s * (q - z))^T from packed integers; the weight is never stored in floating point."""

    def __init__(self, in_features, out_features, bits, group):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        G = bq.ngroups(in_features, group)
        self.register_buffer("qweight", torch.zeros(-(-out_features * in_features * bits // 32), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, G, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=torch.float16))

    def forward(self, x):   # (..., in) -> (..., out)
        y = qmatmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.bits, self.group,
                    self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}"


class OnlineTransform(nn.Module):
    """x -> T x for a learned T = Q (x) Butterfly(m) (angles theta, K x K factor Q) or a fixed dense T."""

    def __init__(self, n, K=1, m=None, dense=False):
        super().__init__()
        self.n, self.K, self.dense = n, K, dense
        if dense:
            self.register_buffer("M", torch.zeros(n, n))
        else:
            m = m or n
            L = m.bit_length() - 1
            self.register_buffer("theta", torch.zeros(L, m // 2))
            if K > 1:
                self.register_buffer("Q", torch.zeros(K, K))

    def forward(self, x):
        if self.dense:
            return x @ self.M.T.to(x.dtype)
        return butterfly(x, self.theta.cos(), self.theta.sin(), self.Q if self.K > 1 else None)

    def extra_repr(self):
        return f"n={self.n}, " + ("dense" if self.dense else f"K={self.K}")


def fixed_matrix(n, kind, seed):
    """A fixed baseline transform, rebuilt from its kind and seed (files store these, not n x n matrices)."""
    M, _ = bq.fixed_rotation(n, kind, torch.Generator().manual_seed(seed))
    return M.float()
