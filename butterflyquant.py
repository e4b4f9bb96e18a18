"""
ButterflyQuant, the method, in reading order: computational invariance, the butterfly, the composite transform
for any n, quantizers and the straight-through estimator, the losses, the learning of a transform, GPTQ, packing,
and the fixed baselines (Hadamard constructions) last. Pure math on tensors: no model, no files, no flags.

Computational invariance: for orthogonal T,  y = W x = (W T^T)(T x).
We store Q(W T^T) and apply T to the input online, choosing T so that W T^T quantizes well.
"""
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn


# -----------------------------------------------------------------------------
# the butterfly

def butterfly_apply(x, cos, sin, transpose=False):
    """y = B x along the last dim in O(n log n). B = S_{L-1} ... S_1 S_0, where stage i rotates every pair
    (j, j + 2^i) with j mod 2^(i+1) < 2^i by [[c, -s], [s, c]]. cos, sin: (L, n/2), pair p = block * 2^i + offset.
    transpose=True applies B^T = S_0^T ... S_{L-1}^T (the inverse)."""
    n = x.shape[-1]
    rows = max(1, (1 << 17) // n)       # ~512 KB of fp32 per chunk: all log2(n) stages stay in cache
    if x.numel() > 2 * rows * n:
        flat = x.reshape(-1, n)
        return torch.cat([butterfly_apply(c, cos, sin, transpose) for c in flat.split(rows)]).view(x.shape)
    lead = x.shape[:-1]
    for i in (reversed(range(cos.shape[0])) if transpose else range(cos.shape[0])):
        s = 1 << i
        xv = x.reshape(*lead, n // (2 * s), 2, s)                 # (..., blocks, 2, s)
        a, b = xv[..., 0, :], xv[..., 1, :]
        c, sn = cos[i].view(n // (2 * s), s), sin[i].view(n // (2 * s), s)
        if transpose:
            sn = -sn
        x = torch.stack((c * a - sn * b, sn * a + c * b), -2).reshape(*lead, n)
    return x


def is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


class Butterfly(nn.Module):
    """log2(n) stages of n/2 Givens rotations: (n/2) log2(n) angles, orthogonal for any angles.
    theta = 0 is the identity; theta = pi/4 makes every entry +-1/sqrt(n) (a Hadamard matrix up to signs), and so
    does pi/4 + k pi/2 for any integers k ('rhadamard': random k, a randomised Hadamard as QuaRot uses)."""

    def __init__(self, n, init="identity", generator=None):
        super().__init__()
        if not is_pow2(n):
            raise ValueError(f"Butterfly needs a power of two, got n={n} (use Transform for other sizes)")
        self.n = n
        L = n.bit_length() - 1
        theta = torch.zeros(L, n // 2)
        if init == "hadamard":
            theta.fill_(math.pi / 4)
        elif init == "rhadamard":
            theta.copy_(math.pi / 4 + math.pi / 2 * torch.randint(0, 4, theta.shape, generator=generator))
        elif init == "random":
            theta.uniform_(-math.pi, math.pi, generator=generator)
        elif init != "identity":
            raise ValueError(f"unknown butterfly init {init!r}")
        self.theta = nn.Parameter(theta)

    def forward(self, x):            # (..., n) -> (..., n): T x for each row x
        return butterfly_apply(x, self.theta.cos(), self.theta.sin())

    def transpose(self, x):          # T^T x
        return butterfly_apply(x, self.theta.cos(), self.theta.sin(), transpose=True)

    def matrix(self):                # dense T: row i of forward(I) is T e_i = column i of T
        return self.forward(torch.eye(self.n, dtype=self.theta.dtype, device=self.theta.device)).T


# -----------------------------------------------------------------------------
# the composite transform for any n: T = Q_K (x) Butterfly(m)

def cayley(A):
    """Orthogonal Q = (I - S)(I + S)^-1 for skew S = A - A^T (A upper-triangular parameters); Q(0) = I."""
    S = A.triu(1) - A.triu(1).T
    I = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return torch.linalg.solve(I + S, I - S, left=False)


def kron_split(n, max_k=256, strict=False):
    """n = K * m with m a power of two: the smallest K <= max_k that has a Hadamard construction (K = 1 or a Paley
    order: 576 = 36 x 16, 1536 = 12 x 128). None if there is none and strict, else the odd part (11008 = 43 x 256)."""
    m = n & -n
    K = n // m
    while m >= 1 and K <= max_k:
        if K == 1 or _paley(K) is not None:
            return K, m
        K, m = K * 2, m // 2
    return None if strict else (n // (n & -n), n & -n)


class Transform(nn.Module):
    """T = Q_K (x) B(m), exactly orthogonal for any parameters. Q_K = base @ cayley(A), with base the identity,
    the normalised K x K Hadamard (init 'hadamard'; a random orthogonal one where K has none), or random.
    For x viewed as (..., K, m):  T x = Q_K X B(m)^T, i.e. B on the last axis, then Q_K on the K axis."""

    def __init__(self, n, init="identity", generator=None, dtype=torch.float32):
        super().__init__()
        self.n = n
        self.K, self.m = kron_split(n)
        self.butterfly = Butterfly(self.m, init, generator).to(dtype)
        self.init = init
        if self.K > 1:
            if init == "identity":
                base = torch.eye(self.K, dtype=torch.float64)
            elif init in ("hadamard", "rhadamard") and _paley(self.K) is not None:
                base = _paley(self.K) / math.sqrt(self.K)
            else:
                base = random_orthogonal(self.K, generator)
            self.register_buffer("base", base.to(dtype))
            self.A = nn.Parameter(torch.zeros(self.K, self.K, dtype=dtype))

    @classmethod
    def from_export(cls, entry, theta, Q=None):
        """The inverse of export: the same T, with its K x K factor as the base and A = 0, so it learns on."""
        T = cls(int(entry["n"]))
        if (T.K, T.m) != (entry["K"], entry["m"]):
            raise ValueError(f"transform {entry}: this code splits n = {T.n} as {T.K} x {T.m}")
        with torch.no_grad():
            T.butterfly.theta.copy_(theta)
            if T.K > 1:
                T.base.copy_(Q)
        return T

    def export(self):
        """What inference needs: the file's description of T and its tensors (angles, K x K factor or None)."""
        entry = dict(n=self.n, dense=False, K=self.K, m=self.m)
        return entry, self.butterfly.theta.detach().float(), self.q().detach().float() if self.K > 1 else None

    def num_params(self):
        return self.butterfly.theta.numel() + (self.K * (self.K - 1) // 2 if self.K > 1 else 0)

    def q(self):
        return self.base.to(self.A.dtype) @ cayley(self.A)

    def _b(self, y, transpose):
        """B y on the last axis. For m <= 512 a dense m x m product is faster than log2(m) elementwise passes
        (and B itself costs O(m^2 log m)); the same matrix either way."""
        if self.m <= 512:
            B = self.butterfly.matrix()
            return y @ (B if transpose else B.T)
        return self.butterfly.transpose(y) if transpose else self.butterfly(y)

    def forward(self, x):            # (..., n)
        y = self._b(x.reshape(*x.shape[:-1], self.K, self.m), False)     # (..., K, m)
        if self.K > 1:
            y = self.q() @ y
        return y.reshape(x.shape)

    def transpose(self, x):          # T^T x = (Q^T (x) B^T) x
        y = x.reshape(*x.shape[:-1], self.K, self.m)
        if self.K > 1:
            y = self.q().T @ y
        return self._b(y, True).reshape(x.shape)

    def matrix(self):                # Q (x) B
        B = self.butterfly.matrix()
        return torch.kron(self.q(), B.contiguous()) if self.K > 1 else B


# -----------------------------------------------------------------------------
# quantizers: w ~ s * (q - z), q in {0 .. 2^bits - 1}, per output row and group of g input columns

@dataclass
class QuantConfig:
    bits: int = 2
    group: int = 128          # consecutive input columns per scale; 0 = one group per row (per channel)
    sym: bool = False         # symmetric: z fixed at 2^(bits-1) (GPTQ's convention)
    clip: bool = True         # MSE-optimal shrink of the range (grid search)
    gptq: bool = True         # the final quantizer: GPTQ (error feedback through H^-1) or round to nearest
    act_order: bool = False   # GPTQ column order by decreasing diag(H)

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 8 (got {self.bits})")
        if self.group != 0 and self.group < 8:
            raise ValueError(f"group size must be 0 (per channel) or at least 8 (got {self.group})")


def _minmax_params(xmin, xmax, bits, sym):
    maxq = 2 ** bits - 1
    xmin, xmax = torch.minimum(xmin, torch.zeros_like(xmin)), torch.maximum(xmax, torch.zeros_like(xmax))
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmax - xmin) == 0
    xmin, xmax = torch.where(flat, -torch.ones_like(xmin), xmin), torch.where(flat, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp_min(1e-5)
    scale = scale + (scale.half().float() - scale).detach()   # use what is stored (fp16); gradient as if fp32
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quant_params(w, bits, sym=False, clip=True, mask=None, grid=100, maxshrink=0.8):
    """Per-row scale and zero of w (R, g). clip: shrink [min, max] by p in {1, 0.99, ..., 0.2} and keep the
    p with the least squared error per row (GPTQ's mse search). mask marks real entries (padding excluded)."""
    return clip_search(w, bits, sym, clip, mask, grid, maxshrink)[:2]


def clip_search(w, bits, sym=False, clip=True, mask=None, grid=100, maxshrink=0.8):
    """quant_params, and the shrink p (R,) each row kept (1: min-max)."""
    xmin, xmax = w.amin(1), w.amax(1)
    scale, zero = _minmax_params(xmin, xmax, bits, sym)
    shrink = torch.ones_like(xmin)
    if not clip:
        return scale, zero, shrink
    maxq = 2 ** bits - 1
    best = torch.full_like(xmin, float("inf"))
    for i in range(int(maxshrink * grid) + 1):
        p = 1 - i / grid
        s, z = _minmax_params(p * xmin, p * xmax, bits, sym)
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
        err = (s[:, None] * (q - z[:, None]) - w).pow(2)
        if mask is not None:
            err = err * mask
        err = err.sum(1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
        shrink = torch.where(better, torch.full_like(shrink, p), shrink)
    return scale, zero, shrink


def ngroups(n, group):
    return 1 if group == 0 else -(-n // group)


def _grouped(w, group):
    """(R, n) -> (R, G, g) with the short last group padded by repeating its last column, and the mask."""
    R, n = w.shape
    g = n if group == 0 else group
    G = -(-n // g)
    pad = G * g - n
    mask = torch.ones(G * g, dtype=w.dtype, device=w.device)
    if pad:
        w = torch.cat((w, w[:, -1:].expand(R, pad)), 1)
        mask[n:] = 0
    return w.view(R, G, g), mask.view(G, g)


def expand_groups(t, n, group):
    """(R, G) per-group values -> (R, n) per-column values."""
    g = n if group == 0 else group
    return t.repeat_interleave(g, dim=1)[:, :n]


def _round_on(wg, lo, hi, cfg):
    """RTN of the groups wg (R, G, g) on [min * lo, max * hi] per group: (q, scale, zero)."""
    scale, zero = _minmax_params(wg.amin(-1) * lo, wg.amax(-1) * hi, cfg.bits, cfg.sym)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 2 ** cfg.bits - 1)
    return q, scale, zero


def clip_choice(w, cfg: QuantConfig, H=None):
    """The shrink p (R, G) of each group's [min, max] that RTN rounds w (R, n) on: the clip search's (1 where it
    keeps min-max, or without cfg.clip), and given the inputs' H (n, n), each row's best of three ranges by its own
    loss e H e^T: the search scored by the error weighted with diag(H), the unweighted search, and min-max. The
    layer loss trace(E H E^T) is a sum over rows, so it is never above that of any of the three."""
    R, n = w.shape
    wg, mask = _grouped(w.float(), cfg.group)
    G, g = mask.shape

    def search(weight):
        p = clip_search(wg.reshape(R * G, g), cfg.bits, cfg.sym, cfg.clip,
                        mask=None if weight is None else weight.expand(R, G, g).reshape(R * G, g))[2]
        return p.view(R, G)

    p = search(mask if mask.min() == 0 else None)
    if H is not None and cfg.clip:
        def row_loss(p):
            q, s, z = _round_on(wg, p, p, cfg)
            E = (s[..., None] * (q - z[..., None])).view(R, G * g)[:, :n] - w.float()
            return ((E @ H.float()) * E).sum(1)
        best = row_loss(p)
        diag = _grouped(torch.diagonal(H).float().view(1, n), cfg.group)[0] * mask
        for other in (search(diag), torch.ones_like(p)):
            loss = row_loss(other)
            p, best = torch.where((loss < best)[:, None], other, p), torch.minimum(loss, best)
    return p


def quantize(w, cfg: QuantConfig, H=None, gamma=None):
    """Round to nearest: w (R, n) -> integers q (R, n) uint8, scale (R, G), zero (R, G).
    The range of each group: min-max shrunk by clip_choice (the clip search, each row's best of three by
    e H e^T given H), or by learned factors sigmoid(gamma) (2, R, G) (OmniQuant's learnable weight clipping)."""
    R, n = w.shape
    wg, mask = _grouped(w.float(), cfg.group)
    G, g = mask.shape
    if gamma is not None:
        lo, hi = torch.sigmoid(gamma[0]), torch.sigmoid(gamma[1])
    else:
        lo = hi = clip_choice(w, cfg, H)
    q, scale, zero = _round_on(wg, lo, hi, cfg)
    return q.view(R, G * g)[:, :n].to(torch.uint8), scale, zero


def clip_logits(w, cfg: QuantConfig, pmax=0.99):
    """Learned clip factors that start where the clip search ends: gamma (2, R, G) with sigmoid(gamma) the
    search's shrink of each group's [min, max] (at most pmax, so that the logit stays finite and learnable)."""
    return torch.logit(clip_choice(w, cfg).clamp(max=pmax)).expand(2, -1, -1).clone()


def clip_grid(w, cfg: QuantConfig, H=None):
    """quantize's ranges of w (R, n) as logits (2, R, G) on which fake_quant_ste is, in the forward pass,
    quantize(w, cfg, H) (a shrink of 1 kept: sigmoid(logit(1 - 1e-6)) rounds to it at these bits)."""
    return torch.logit(clip_choice(w, cfg, H).clamp(max=1 - 1e-6)).expand(2, -1, -1).clone()


def dequantize(q, scale, zero, group):
    """w_hat = s * (q - z), groups expanded along the input dim."""
    n = q.shape[1]
    return expand_groups(scale, n, group) * (q.float() - expand_groups(zero, n, group))


def latent_codes(q, r, qmax):
    """The codes a latent offset r gives the integer codes q (R, n): round(clamp(q + r, 0, qmax)); q where r is None."""
    return q if r is None else torch.round(torch.clamp(q.float() + r, 0, qmax))


class _CodesLinear(torch.autograd.Function):
    """y = x (s (c - z))^T, c = latent_codes(q, r, qmax), with gradients for x, the group scales s and, given, the
    latent offsets r (straight through the rounding: dL/dr = dL/dc inside [0, qmax], 0 where the clamp holds); q and
    z stay fixed. It saves the integer codes (and r, a parameter already held), not the weight: W is rebuilt in the
    backward pass, so a pass over a large model holds one byte per weight instead of four, and with r none of what
    autograd would keep per weight for the clamp, the group expansion and the product (W among it)."""

    @staticmethod
    def forward(ctx, x, q, scale, zero, group, r=None, qmax=None):
        ctx.save_for_backward(x, q, scale, zero, r)
        ctx.group, ctx.qmax = group, qmax
        return x @ dequantize(latent_codes(q, r, qmax), scale, zero, group).to(x.dtype).T

    @staticmethod
    def backward(ctx, gy):      # gx = gy W;  ds_rg = sum_{i in g} (gy^T x)_ri (c_ri - z_rg);  dr_ri = (gy^T x)_ri s_rg
        x, q, scale, zero, r = ctx.saved_tensors
        c = latent_codes(q, r, ctx.qmax)
        R, n = q.shape
        gx = gy @ dequantize(c, scale, zero, ctx.group).to(gy.dtype)
        gW = gy.reshape(-1, R).T.float() @ x.reshape(-1, n).float()                  # (R, n)
        gr = None
        if r is not None:
            c_in = q.float() + r
            gr = (gW * expand_groups(scale.float(), n, ctx.group) * ((c_in >= 0) & (c_in <= ctx.qmax))).to(r.dtype)
        gs = gW * (c.float() - expand_groups(zero.float(), n, ctx.group))
        G, g = scale.shape[1], n if ctx.group == 0 else ctx.group
        gs = torch.nn.functional.pad(gs, (0, G * g - n)).view(R, G, g).sum(-1)                   # (R, G)
        return gx, None, gs.to(scale.dtype), None, None, gr, None


def codes_linear(x, q, scale, zero, group, r=None, qmax=None):
    """x (..., n) -> x @ dequantize(c, scale, zero)^T (..., R), c = q, or round(clamp(q + r, 0, qmax)) given a
    latent offset r (R, n); differentiable in x, scale (R, G) and r."""
    return _CodesLinear.apply(x, q, scale, zero, group, r, qmax)


def round_ste(x):
    """round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ste(w, cfg: QuantConfig, gamma=None):
    """Differentiable RTN for training: min-max scales from w itself (no clip search), or the range shrunk by
    learned factors sigmoid(gamma) (2, R, G); rounding by STE. Gradients reach w and gamma."""
    R, n = w.shape
    wg, _ = _grouped(w, cfg.group)
    xmin, xmax = wg.amin(-1), wg.amax(-1)
    if gamma is not None:
        xmin, xmax = xmin * torch.sigmoid(gamma[0]), xmax * torch.sigmoid(gamma[1])
    scale, zero = _minmax_params(xmin, xmax, cfg.bits, cfg.sym)
    zero = zero.detach()    # the integer zero point carries no gradient; the scale does
    q = torch.clamp(round_ste(wg / scale[..., None]) + zero[..., None], 0, 2 ** cfg.bits - 1)
    return (scale[..., None] * (q - zero[..., None])).reshape(R, -1)[:, :n]


# -----------------------------------------------------------------------------
# losses

def kl_divergence(logp_ref, logp):
    """KL(ref || model) per position, (..., V) log-probabilities -> (...): sum_v p_ref (log p_ref - log p),
    with 0 log 0 = 0 where p_ref = 0 (a NaN stays NaN: a broken reference must not read as a perfect match)."""
    p = logp_ref.exp()
    return torch.where(p == 0, 0.0, p * (logp_ref - logp)).sum(-1)


def recon_loss_direct(W, What, T, X):
    """||W X - Q(W T^T) (T X)||^2 with What = Q(W T^T) (R, n), T (n, n), X (n, tokens)."""
    return (W @ X - What @ (T @ X)).pow(2).sum()


def recon_loss_trace(W, What, T, H):
    """The same loss through H = X X^T only:  ||(W - What T) X||^2 = trace(E H E^T),  E = W - What T.
    Cost O(R n^2) per step, independent of the number of calibration tokens."""
    E = W - What @ T
    return ((E @ H) * E).sum()


def damped(H, percdamp=0.01):
    """H + percdamp * mean(diag H) I, a new tensor: GPTQ's damping, which keeps H invertible where inputs are
    (nearly) dead. In place on the diagonal: no n x n identity (6.6 GB in float64 at n = 28672)."""
    Hd = H.clone()
    Hd.diagonal().add_(percdamp * torch.diagonal(H).mean())
    return Hd


def gptq_column_weights(H, percdamp=0.01):
    """d (n,): GPTQ leaves the loss trace(E H E^T) = sum_rows sum_i d_i e_i^2, with e_i the rounding error of
    column i after the errors of columns < i were pushed onto it, and d_i = 1 / [chol(H^-1)]_ii^2 the variance of
    input i that the inputs after it do not explain. With H = R R^T, R upper triangular, d_i = R_ii^2: one
    Cholesky of H with its order reversed. H is damped as gptq() damps it."""
    return torch.diagonal(torch.linalg.cholesky(damped(H, percdamp).flip(0, 1))).flip(0).pow(2)


def gptq_feedback(H, percdamp=0.01):
    """F (n, n): GPTQ leaves the weight error W - Q = Delta F, Delta (R, n) being each column's rounding error
    as it is quantized (after the errors of the columns before it were pushed onto it). With the damped
    H^-1 = U^T U, U upper triangular and D = diag(U), column i's error Delta_i / U_ii goes to columns j >= i
    times U_ij, so F = D^-1 U, and (W - Q) H (W - Q)^T = Delta D^-2 Delta^T. H is damped as gptq() damps it."""
    H = H.clone().float()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    U = gptq_hinv_factor(H, percdamp)
    return U / torch.diagonal(U)[:, None]


def gptq_hinv_factor(H, percdamp=0.01):
    """U upper triangular with U^T U = (H + percdamp * mean(diag H) I)^-1: the rows GPTQ pushes errors along."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped(H, percdamp))), upper=True)


def fake_quant_gptq_ste(w, F, cfg: QuantConfig, gamma=None):
    """A differentiable stand-in for GPTQ: w - Delta F with F = gptq_feedback(H), and the straight-through RTN
    error Delta = w - fake_quant_ste(w) in place of the rounding error of GPTQ's updated columns (the same grid,
    errors of the same size). Its output error has GPTQ's shape, pushed where H is small."""
    return w - (w - fake_quant_ste(w, cfg, gamma)) @ F


def gptq_proxy_loss(Wr, d, cfg, base):
    """GPTQ's expected layer loss for the rotated weights Wr = W T^T (R, n) and d = gptq_column_weights(T H T^T),
    relative to base = trace(W H W^T). Each column's error is taken as uniform over its group's step s:
        E[trace(E H E^T)] ~ sum_{rows r, groups g} s_rg^2 / 12 * sum_{i in g} d_i,   s_rg = (max - min) / (2^b - 1).
    It knows GPTQ (d, not H: error feedback removes the part of an error the later inputs can explain) and is
    smooth in T (no rounding): T learns to make the steps small where d is large."""
    wg, mask = _grouped(Wr, cfg.group)                                          # (R, G, g)
    s, _ = _minmax_params(wg.amin(-1), wg.amax(-1), cfg.bits, cfg.sym)          # (R, G)
    dg = (_grouped(d.view(1, -1), cfg.group)[0][0] * mask).sum(-1)              # (G,)
    return (s.pow(2) * dg).sum() / 12 / base


def uniformity_loss(z, bits, temperature=0.5):
    """KL(p || uniform) of a soft histogram of each row of z (tokens, n) over the 2^bits bins of a min-max
    quantizer spanning that row. Soft assignment: softmax_k(-((z - c_k)/width)^2 / temperature). Zero when
    every bin is used equally; pushes T X away from peaked, outlier-dominated distributions."""
    B = 2 ** bits
    lo, hi = z.amin(-1, keepdim=True).detach(), z.amax(-1, keepdim=True).detach()
    width = (hi - lo).clamp_min(1e-8) / B
    centers = lo + width * (torch.arange(B, device=z.device, dtype=z.dtype) + 0.5)     # (tokens, B)
    d = (z[..., None] - centers[:, None, :]) / width[..., None]                       # (tokens, n, B)
    p = torch.softmax(-d.pow(2) / temperature, -1).mean(1)                            # (tokens, B)
    return (p * torch.log(p * B + 1e-12)).sum(-1).mean()


# -----------------------------------------------------------------------------
# learning the transform of one site
#
#   layer (the paper's):  min_T  trace(E H E^T) / trace(W H W^T)  +  lambda * KL(hist(T X) || uniform),
#                         E = W - Q(W T^T) T,  Q the straight-through min-max RTN
#   gptq:                 min_T  sum_{r,g} s_rg(W T^T)^2 / 12 * sum_{i in g} d_i(T H T^T)  / trace(W H W^T)
#                         (gptq_proxy_loss: GPTQ's expected loss; d is recomputed every `refresh` steps)
#
# W stacks the linears that read the site's input (q/k/v share one T).

@dataclass
class LearnConfig:
    init: Optional[str] = None    # identity | hadamard | rhadamard | random | best (the better of identity and
                                  # hadamard); gptq and kl: rhadamard (kl on rtnclip or rtnh: identity), else best
    steps: Optional[int] = None   # per site (layer: 30, gptq: 300), per block (block: 20) or model (kl: 80)
    lr: Optional[float] = None    # layer: 0.5 with SGD; gptq: 0.02, block and kl: 0.01 with Adam
    rows: int = 512           # output rows per step: the loss is a sum over rows, so a subset estimates it; 0 = all
    checkpoints: int = 1      # times per site the iterate is scored with the final quantizer (the best is kept)
    optim: Optional[str] = None   # sgd (momentum 0.9) or adam, both cosine-decayed; layer: sgd; gptq, block, kl: adam
    lambda_unif: float = 0.0  # weight of the uniformity regulariser (layer and gptq objectives)
    objective: str = "layer"  # layer: each site alone (trace loss); gptq: each site alone (GPTQ's expected
                              # loss); block: the four sites of a block jointly; kl: every site of the model
                              # jointly on the next-token KL (calibrate.py: it needs the model; its default)
    batch: int = 2            # block objective: sequences per step
    tokens: int = 512         # block objective: tokens of each calibration sequence it learns on (a prefix)
    lwc: bool = False         # block and kl objectives: also learn per-group clip factors (used by RTN and GPTQ)
    clip_lr: Optional[float] = None  # their learning rate (Adam; block: 5e-3 from 0.98, kl: 1e-2 from the search)
    refresh: int = 10         # gptq objective, the kl objective's gptq, rtnclip, rtnh and the block objective's gptq
                              # stand-ins: steps between recomputations
                              # of d(T H T^T) or F(T H T^T) (an O(n^3) Cholesky), or of the clip search's ranges
    kl_quantizer: str = "rtn"  # kl objective (and block: rtn or gptq): the straight-through quantizer, rtn (min-max,
                               # or the learned clips),
                               # rtnclip (RTN on the unweighted clip search's ranges), rtnh (on the file's RTN
                               # ranges: the search with its H-scored choice per row, H at every site;
                               # calibrate.py's default under --rtn without --lwc) or gptq (fake_quant_gptq_ste, on the clip search's
                               # grid or the learned clips; calibrate.py's default under GPTQ), or gptaq
                               # (gptq on --gptaq's target W*: calibrate.py, with --gptaq only)
    block_input: str = "quantized"  # block objective: the block's inputs X, the output of the blocks already quantized
                                    # (EfficientQAT), or fp: of the unquantized blocks (FlatQuant); Y = block(X) unquantized

    def __post_init__(self):
        defaults = dict(layer=("best", 30, 0.5, "sgd"), gptq=("rhadamard", 300, 0.02, "adam"),
                        block=("best", 20, 0.01, "adam"), kl=("rhadamard", 80, 0.01, "adam"))
        if self.objective not in defaults:
            raise ValueError(f"unknown objective {self.objective!r}")
        init, steps, lr, optim = defaults[self.objective]
        init = "identity" if self.kl_quantizer in ("rtnclip", "rtnh") else init     # the unrotated model: the best start
        self.init = init if self.init is None else self.init
        self.steps = steps if self.steps is None else self.steps
        self.lr = lr if self.lr is None else self.lr
        self.optim = optim if self.optim is None else self.optim
        self.clip_lr = (1e-2 if self.objective == "kl" else 5e-3) if self.clip_lr is None else self.clip_lr
        if self.batch < 1 or self.tokens < 2 or self.refresh < 1 or not (math.isfinite(self.clip_lr) and self.clip_lr > 0):
            raise ValueError("batch must be >= 1, tokens >= 2, refresh >= 1 and clip_lr positive")
        if self.init not in ("identity", "hadamard", "rhadamard", "random", "best"):
            raise ValueError(f"unknown init {self.init!r}")
        if self.block_input not in ("quantized", "fp"):
            raise ValueError(f"unknown block input {self.block_input!r} (quantized or fp)")
        if self.block_input != "quantized" and self.objective != "block":
            raise ValueError("--block_input is the block objective's")
        if self.lwc and self.objective not in ("block", "kl"):
            raise ValueError("learned clip factors (--lwc) are learned by the block and kl objectives only")
        if self.objective == "kl" and (self.init == "best" or self.optim != "adam"):
            raise ValueError("the kl objective starts every site from one --init (identity, hadamard, rhadamard or "
                             "random; 'best' needs a layer loss) and learns with adam")
        if self.kl_quantizer not in ("rtn", "rtnclip", "rtnh", "gptq", "gptaq"):
            raise ValueError(f"unknown kl quantizer {self.kl_quantizer!r}")
        if self.kl_quantizer != "rtn" and self.objective != "kl" and (self.objective, self.kl_quantizer) != ("block", "gptq"):
            raise ValueError(f"the {self.kl_quantizer} stand-in (--kl_quantizer {self.kl_quantizer}) is the kl objective's "
                             f"only (the block objective takes rtn or gptq)")
        if self.kl_quantizer in ("rtnclip", "rtnh") and self.lwc:
            raise ValueError(f"--kl_quantizer {self.kl_quantizer} learns on the clip search's ranges, --lwc learns "
                             f"its own: drop one of them")
        if self.optim not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optim!r}")
        if self.steps < 0 or self.rows < 0 or self.checkpoints < 1:
            raise ValueError("steps and rows must be >= 0 and checkpoints >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.lambda_unif) and self.lambda_unif >= 0):
            raise ValueError("the learning rate must be positive and lambda_unif >= 0")


class LearningError(ValueError):
    """The loss became NaN or inf while learning (a too large learning rate, or NaN in the inputs)."""


def descend(opt, sched, loss, step):
    """One step of the optimizer and its schedule; a NaN/inf loss stops the learning with a clear error."""
    if not torch.isfinite(loss):
        raise LearningError(f"NaN/inf loss at step {step} (learning rate {opt.param_groups[0]['lr']:.3g})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def quantize_rotated(W, H, M, cfg: QuantConfig, gamma=None):
    """The quantizer the file holds, on the rotated weights W T^T: GPTQ with T H T^T, or RTN; each group's range
    from the clip search, or from learned clip factors sigmoid(gamma) (2, R, G)."""
    Wr = W @ M.T
    if cfg.gptq:
        return gptq(Wr, M @ H @ M.T, cfg, act_order=cfg.act_order, gamma=gamma)
    return quantize(Wr, cfg, H=None if gamma is not None else M @ H @ M.T, gamma=gamma)   # learned ranges need no H


@torch.no_grad()
def score(W, H, M, cfg: QuantConfig, base, gamma=None):
    """(trace(E H E^T) / base under the final quantizer, its (q, scale, zero)); base = trace(W H W^T)."""
    qsz = quantize_rotated(W, H, M, cfg, gamma)
    return (recon_loss_trace(W, dequantize(*qsz, cfg.group), M, H) / base).item(), qsz


def start_transform(W, H, qcfg: QuantConfig, init, seed, base):
    """The starting T for W (R, n) and its (loss, (q, scale, zero)) under the final quantizer. 'best': the better
    of identity and hadamard (the butterfly contains both), scored by that quantizer."""
    def make(init):
        return Transform(W.shape[1], init, torch.Generator().manual_seed(seed)).to(W.device)

    cands = [make("identity"), make("hadamard")] if init == "best" else [make(init)]
    scores = [score(W, H, t.matrix().detach(), qcfg, base) for t in cands]
    i = min(range(len(cands)), key=lambda j: scores[j][0])
    return cands[i], scores[i][0], scores[i][1]


def learn_transform(W, H, qcfg: QuantConfig, lcfg: LearnConfig, seed, Xu=None):
    """Learn T = Q_K (x) B(m) for W (R, n) with inputs summarised by H (n, n) (and tokens Xu (tokens, n) for the
    uniformity term). The STE gradient is noisy and RTN is not the final quantizer, so iterates are scored with
    the final one `checkpoints` times and the best is kept, the start included: learning never ends worse than
    its start. Returns (T, start loss, best loss, best (q, scale, zero))."""
    base = ((W @ H) * W).sum()          # trace(W H W^T): the loss of quantizing everything to zero
    g = torch.Generator(device=W.device).manual_seed(seed)
    T, start, best_q = start_transform(W, H, qcfg, lcfg.init, seed, base)
    best, best_state = start, copy.deepcopy(T.state_dict())

    d = None

    def loss_of(rows, step):
        """The relative loss on a subset of rows, with T in its fast form: Q(W T^T) has rows Q(T w), and
        E = W - Q(W T^T) T has rows w - T^T q."""
        nonlocal d
        Ws = W if rows is None else W[rows]
        rbase = base * Ws.shape[0] / W.shape[0]
        if lcfg.objective == "gptq":
            if (step - 1) % lcfg.refresh == 0:
                with torch.no_grad():
                    M = T.matrix()
                    d = gptq_column_weights(M @ H @ M.T)
            rec = gptq_proxy_loss(T(Ws), d, qcfg, rbase)
        else:
            E = Ws - T.transpose(fake_quant_ste(T(Ws), qcfg))
            rec = ((E @ H) * E).sum() / rbase
        if lcfg.lambda_unif:
            return rec + lcfg.lambda_unif * uniformity_loss(T(Xu), qcfg.bits)
        return rec

    params = list(T.parameters())
    opt = (torch.optim.SGD(params, lr=lcfg.lr, momentum=0.9) if lcfg.optim == "sgd"
           else torch.optim.Adam(params, lr=lcfg.lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, lcfg.steps))
    every = max(1, lcfg.steps // lcfg.checkpoints)
    for step in range(1, lcfg.steps + 1):
        rows = None
        if lcfg.rows and W.shape[0] > lcfg.rows:
            rows = torch.randperm(W.shape[0], generator=g, device=W.device)[: lcfg.rows]
        descend(opt, sched, loss_of(rows, step), step)
        if step % every == 0 or step == lcfg.steps:
            s, qsz = score(W, H, T.matrix().detach(), qcfg, base)
            if s < best:
                best, best_state, best_q = s, copy.deepcopy(T.state_dict()), qsz
    T.load_state_dict(best_state)
    return T, start, best, best_q


# -----------------------------------------------------------------------------
# learning the transforms of a block jointly (the block objective)
#
#   min_{T, gamma}  mean || block(X; Q(W_l T_s^T) for every linear l at site s, T_s x online) - Y ||^2
#
# Y is the unquantized block's output on the same X, so errors are measured where they matter: after q and k
# pass the softmax, after SwiGLU, summed over the block's linears. Q is the straight-through RTN, with learned
# clip factors sigmoid(gamma) when lwc; or, given H at every site, GPTQ's stand-in Q(W') = W' - (W' - RTN(W'))
# F(T H T^T) (fake_quant_gptq_ste) on the clip search's grid or the learned clips, F recomputed every `refresh`
# steps. The block itself is a callable: this file knows no model.

def block_loss(forward, weights, sites, transforms, x, y, qcfg: QuantConfig, gammas=None, feedback=None, grids=None):
    """mean over tokens t of ||forward(Q(W T^T), x)_t - y_t||^2 / ||y_t||^2, straight-through Q; the rows of
    Q(W T^T) are Q(T w). Relative per token: every later layer reads a token through an RMSNorm, and a massive
    activation (SmolLM2's first token carries up to 98% of sum_t ||y_t||^2 in its middle blocks) would otherwise
    make the plain MSE the error of that one token. feedback: None (Q = RTN) or {slot: F (n, n)} (Q = GPTQ's
    stand-in); the grid: gammas {name: (2, out, groups)} if given, else grids {name: ...} if given, else min-max."""
    Wq = {}
    for slot, names in sites:
        for name in names:
            Wr, grid = transforms[slot](weights[name]), (gammas or grids or {}).get(name)
            Wq[name] = fake_quant_ste(Wr, qcfg, grid) if feedback is None else \
                fake_quant_gptq_ste(Wr, feedback[slot], qcfg, grid)
    return ((forward(Wq, x) - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-30)).mean()


def learn_block(forward, weights, sites, transforms, X, Y, qcfg: QuantConfig, lcfg: LearnConfig, gammas=None,
                generator=None, hessians=None):
    """forward(Wq, x) -> the block's output on x (B, T, dim) with the linear weights Wq {name: (out, in)} and the
    transforms {slot: Transform} applied online in their slots (the caller installs them there).
    weights: {name: W (out, in)} unquantized; sites: [(slot, [names of the linears reading it])].
    gammas: None or {name: (2, out, groups)} clip parameters, learned in place. hessians: None (Q = RTN) or
    {slot: H (n, n)} of the site's input before T (Q = GPTQ's stand-in). Adam, cosine decay.
    Returns (block loss at the start, at the end) over all of X, each with its own transforms' stand-in."""
    params = [p for T in transforms.values() for p in T.parameters()]
    groups = [dict(params=params, lr=lcfg.lr)]
    if gammas is not None:
        groups.append(dict(params=list(gammas.values()), lr=lcfg.clip_lr))
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, lcfg.steps))

    feedback, grids = (None, None) if hessians is None else ({}, {})

    @torch.no_grad()
    def refresh():      # F(T H T^T) at every site; the clip search's grid where no clip factors are learned
        for slot, names in sites:
            M = transforms[slot].matrix()
            feedback[slot] = gptq_feedback(M @ hessians[slot] @ M.T).to(M.dtype)
            for name in names:
                grids[name] = clip_logits(transforms[slot](weights[name]), qcfg)

    def loss_of(x, y):
        return block_loss(forward, weights, sites, transforms, x, y, qcfg, gammas, feedback, grids)

    def full_loss():
        with torch.no_grad():
            return sum(loss_of(X[i:i + lcfg.batch], Y[i:i + lcfg.batch]).item() * len(X[i:i + lcfg.batch])
                       for i in range(0, len(X), lcfg.batch)) / len(X)

    keep = [copy.deepcopy(T.state_dict()) for T in transforms.values()], copy.deepcopy(gammas)
    if hessians is not None:
        refresh()
    start, order, pos = full_loss(), torch.randperm(len(X), generator=generator), 0
    for step in range(1, lcfg.steps + 1):
        if hessians is not None and step > 1 and (step - 1) % lcfg.refresh == 0:
            refresh()
        if pos + lcfg.batch > len(X):
            order, pos = torch.randperm(len(X), generator=generator), 0
        idx = order[pos:pos + lcfg.batch]
        pos += lcfg.batch
        descend(opt, sched, loss_of(X[idx], Y[idx]), step)
    if hessians is not None:
        refresh()
    end = full_loss()
    if end > start:         # learning never ends worse than its start on the block loss
        for T, state in zip(transforms.values(), keep[0]):
            T.load_state_dict(state)
        for name, g in (gammas or {}).items():
            g.data.copy_(keep[1][name])
        end = start
    return start, end


# -----------------------------------------------------------------------------
# GPTQ (Frantar et al. 2022): quantize column by column, pushing each column's error onto the columns not
# yet quantized through the inverse Hessian of ||(W - W_hat) X||^2, H = X X^T.

def gptq(W, H, cfg: QuantConfig, blocksize=128, percdamp=0.01, act_order=False, gamma=None):
    """W (R, n), H (n, n) -> (q, scale, zero) as quantize() returns them. gamma (2, R, G): learned clip factors,
    which fix every group's range from W as given (static groups, as with act_order) so that GPTQ rounds on the
    grid the factors were learned for."""
    W = W.clone().float()
    H = H.clone().float()
    R, n = W.shape
    maxq = 2 ** cfg.bits - 1
    g = n if cfg.group == 0 else cfg.group
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order or gamma is not None
    if static:      # static groups: parameters from the original weights, in the original column order
        _, scale, zero = quantize(W, cfg, gamma=gamma)
    else:
        scale = torch.zeros(R, ngroups(n, cfg.group), device=W.device)
        zero = torch.zeros_like(scale)
    perm = torch.arange(n, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = gptq_hinv_factor(H, percdamp)
    Q = torch.zeros(R, n, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:   # fresh group: parameters from the current (updated) weights
                cur = torch.cat((W1[:, i:], W[:, i2:]), 1)[:, :g]
                s, z = quant_params(cur, cfg.bits, cfg.sym, cfg.clip)
                scale[:, col // g], zero[:, col // g] = s, z
            gi = perm[col] // g
            s, z = scale[:, gi], zero[:, gi]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            Q[:, col] = q
            err = (w - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Qo = torch.empty_like(Q)
    Qo[:, perm] = Q
    return Qo.to(torch.uint8), scale, zero


def gptaq_target(W, H, D, alpha, percdamp=0.01):
    """W* (R, n): the weights GPTQ should fit when its inputs X~ (the site's inputs on the quantized path) differ
    from the inputs X the unquantized model feeds the site (GPTAQ's asymmetric calibration, Li et al. 2025).
    The least-squares fit of the unquantized outputs,  argmin ||W* X~ - W X||^2 = W X X~^T (X~ X~^T)^-1, is
    W* = W + W D H^-1  with  H = X~ X~^T / N,  D = (X - X~) X~^T / N.  alpha in [0, 1] takes that step part way
    (0: GPTQ's own target W); H is damped as gptq() damps it. GPTQ then quantizes W* on H as usual."""
    step = torch.linalg.solve(damped(H.double(), percdamp), D.double().T).T      # D Hd^-1 (Hd symmetric)
    return (W.double() + alpha * (W.double() @ step)).to(W.dtype)


# -----------------------------------------------------------------------------
# packing: one little-endian bit stream per tensor, `bits` bits per value, row after row, in int32 words.
# Value k of the flattened (R, n) tensor lives at bits [k*bits, (k+1)*bits) of the stream: a row costs exactly
# n*bits bits for any n (no per-row padding), and for 2/4/8 bits this is the usual 32/bits values per word.

def pack(q, bits):
    """q (R, n) integers in [0, 2^bits) -> int32 words (ceil(R*n*bits/32),)."""
    flat = q.reshape(-1).to(torch.int64)
    nbits = flat.numel() * bits
    words = torch.zeros(-(-nbits // 32), dtype=torch.int64, device=q.device)
    for b in range(bits):   # scatter bit b of every value to its place in the stream
        pos = torch.arange(flat.numel(), device=q.device) * bits + b
        words.index_add_(0, pos >> 5, ((flat >> b) & 1) << (pos & 31))
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack(words, bits, shape):
    """Inverse of pack: int32 words -> integers of `shape` (uint8)."""
    numel = shape[0] * shape[1]
    w = torch.cat((words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(1, dtype=torch.int64)))
    pos = torch.arange(numel, device=words.device) * bits
    lo, sh = pos >> 5, pos & 31
    v = (w[lo] >> sh) | (w[lo + 1] << (32 - sh))     # a value may straddle two words
    return (v & (2 ** bits - 1)).to(torch.uint8).view(shape)


def stored_bits_per_weight(words, scale, zero, numel):
    """Bits the packed weight actually occupies: stream words + fp16 scales and zeros, per weight."""
    return (words.numel() * 32 + (scale.numel() + zero.numel()) * 16) / numel


# -----------------------------------------------------------------------------
# fixed baselines: Hadamard (Sylvester, Paley I/II, Kronecker products), random orthogonal, identity

def _is_prime(q):
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(K):
    """A K x K Hadamard matrix by Paley's constructions over a prime field, or None.
    Paley I (q = K-1 = 3 mod 4):  H = I + [[0, 1^T], [-1, Q]]
    Paley II (q = K/2-1 = 1 mod 4): H = C (x) [[1,-1],[-1,-1]] + I (x) [[1,1],[1,-1]],  C = [[0, 1^T], [1, Q]]
    with the Jacobsthal matrix Q_ij = chi(j - i), chi the quadratic character mod q."""
    def jacobsthal(q):
        sq = {(x * x) % q for x in range(1, q)}
        chi = torch.tensor([0] + [1 if a in sq else -1 for a in range(1, q)], dtype=torch.float64)
        idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
        return chi[idx]
    q = K - 1
    if _is_prime(q) and q % 4 == 3:
        S = torch.zeros(K, K, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, jacobsthal(q)
        return torch.eye(K, dtype=torch.float64) + S
    q = K // 2 - 1
    if K % 2 == 0 and _is_prime(q) and q % 4 == 1:
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, jacobsthal(q)
        A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


def _sylvester(n):
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H


def hadamard(n):
    """An n x n +-1 matrix with H H^T = n I (Sylvester x Paley), or ValueError where the code has no construction."""
    split = kron_split(n, max_k=n, strict=True)
    if split is None:
        raise ValueError(f"no Hadamard construction for n={n} (try hadamard_fallback)")
    K, m = split
    return torch.kron(_paley(K) if K > 1 else torch.ones(1, 1, dtype=torch.float64), _sylvester(m))


def random_orthogonal(n, generator=None, dtype=torch.float64):
    """Haar-random orthogonal: QR of a Gaussian matrix with the signs of R's diagonal fixed."""
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return (Q * torch.sign(torch.diagonal(R))).to(dtype).contiguous()


def random_signs(n, generator=None):
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def hadamard_fallback(n, generator=None):
    """For sizes with no construction (11008 = 43 x 256): a random orthogonal K x K factor (x) the Hadamard of
    the largest constructible divisor. Returns (orthonormal matrix, label)."""
    best = max(d for d in range(1, n + 1) if n % d == 0 and kron_split(d, max_k=d, strict=True) is not None)
    K = n // best
    Hd = hadamard(best) / math.sqrt(best)
    return torch.kron(random_orthogonal(K, generator), Hd), f"orth{K}xH{best}"


def fixed_rotation(n, kind, generator=None):
    """Orthonormal n x n baseline (float64) and its label: 'identity', 'random', or 'hadamard' (randomised,
    H D / sqrt(n) with random signs D as QuaRot/QuIP# use; the named fallback where no Hadamard exists)."""
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64), "identity"
    if kind == "random":
        return random_orthogonal(n, generator), "random"
    if kind == "hadamard":
        D = random_signs(n, generator)
        if kron_split(n, max_k=n, strict=True) is not None:
            return hadamard(n) * D / math.sqrt(n), "hadamard"
        M, label = hadamard_fallback(n, generator)
        return M * D, f"hadamard-fallback({label})"
    raise ValueError(f"unknown rotation {kind!r}")


def fixed_matrix(n, kind, seed):
    """A fixed baseline transform (fp32), rebuilt from its kind and seed: files store these, not n x n matrices."""
    M, _ = fixed_rotation(n, kind, torch.Generator().manual_seed(seed))
    return M.float()
