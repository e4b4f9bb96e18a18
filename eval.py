"""
Perplexity in the GPTQ/QuaRot protocol: the corpus joined with "\n\n", tokenized once without BOS, cut into
numel // seqlen windows of seqlen tokens, ppl = exp(mean next-token NLL over all windows).

    python eval.py --ckpt smollm2-135m --data ../shared/data/wikitext2_test.txt           # 148 windows: 21.63
    python eval.py --ckpt out/smollm2-135m-w3g128.safetensors --data ../shared/data/c4_eval.jsonl --limit 8
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import llama
from llama import UserError


def read_corpus(path):
    """A .txt is taken as is (already joined); a .jsonl's "text" fields are joined with "\n\n"."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e)[:100]}") from None


def tokenize_corpus(tok, path):
    return torch.tensor(tok.encode(read_corpus(path)), dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids, seqlen=2048, limit=None, batch_size=1, progress=False):
    """exp( sum of NLL over every next-token prediction inside each window / their count )."""
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit:
        n = min(n, limit)
    windows = ids[: n * seqlen].view(n, seqlen)
    dev = next(model.parameters()).device
    nll, count, t0 = 0.0, 0, time.time()
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(dev)
        logits = model(x)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
        if not math.isfinite(nll):
            raise UserError("the model produced a non-finite loss (NaN/inf logits)")
        if progress:
            done = min(i + batch_size, n)
            eta = (time.time() - t0) / done * (n - done)
            print(f"\r  window {done}/{n}  ppl {math.exp(nll / count):.3f}  eta {eta:.0f}s", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser(description="Perplexity (GPTQ/QuaRot protocol) of a checkpoint or calibrated file.")
    p.add_argument("--ckpt", default="smollm2-135m", help="named checkpoint, directory, .gguf or calibrated .safetensors")
    p.add_argument("--data", nargs="+", default=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                              "data", "wikitext2_test.txt")])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="append a JSON line of results to this file")
    a = p.parse_args()
    model, tok = llama.load(a.ckpt)
    if tok is None:
        raise UserError(f"{a.ckpt}: no tokenizer found beside the checkpoint")
    model.to(a.device, getattr(torch, a.dtype))
    for path in a.data:
        ids = tokenize_corpus(tok, path)
        t0 = time.time()
        ppl = perplexity(model, ids, a.seqlen, a.limit, a.batch_size, progress=sys.stderr.isatty())
        n = ids.numel() // a.seqlen if not a.limit else min(a.limit, ids.numel() // a.seqlen)
        res = dict(ckpt=a.ckpt, data=os.path.basename(path), seqlen=a.seqlen, windows=n, ppl=round(ppl, 4),
                   dtype=a.dtype, seconds=round(time.time() - t0, 1))
        print(f"{os.path.basename(path)}: ppl {ppl:.4f} ({n} windows of {a.seqlen})")
        line = json.dumps(res)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
        else:
            print(line)


if __name__ == "__main__":
    llama.cli(main)
