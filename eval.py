"""
Quality and speed of a checkpoint or a calibrated file.

Perplexity in the GPTQ/QuaRot protocol: the corpus joined with "\n\n", tokenized once without BOS, cut into
numel // seqlen windows of seqlen tokens, ppl = exp(mean next-token NLL over all windows). KL divergence against
a reference model on the same windows, as llama.cpp's --kl-divergence reports it: mean KL(ref || model) of the
next-token distributions, its 99th percentile, and the top-1 agreement. KL is paired per token, so it separates
two quantizations with fewer windows than perplexity does.

    python eval.py --ckpt smollm2-135m --data ../shared/data/wikitext2_test.txt           # 148 windows: 21.63
    python eval.py --ckpt out/FILE.safetensors --ref smollm2-135m --data ../shared/data/c4_eval.jsonl --limit 8
    python eval.py --ckpt out/A.safetensors out/B.safetensors --ref smollm2-135m --limit 40   # B paired against A
    python eval.py --ckpt out/FILE.safetensors --speed                # decode tokens/s, beside the fp model's

Several checkpoints share one pass of the reference, and each after the first is also reported against the first,
paired per token (the mean difference of KL and of NLL with its standard error): two quantizations of one model
differ far less, token by token, than either differs from window to window.
"""
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as in calibrate.py: sleeping, not spinning, idle threads
import torch
import torch.nn.functional as F

import butterflyquant as bq
import llama
from llama import UserError


def read_corpus(path):
    """A .txt is taken as is (already joined); a .jsonl's "text" fields are joined with "\n\n"."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                return f.read()
            texts = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not (isinstance(row, dict) and isinstance(row.get("text"), str)):
                        raise UserError(f"{path} line {i}: want an object with a string \"text\", got {line[:60]!r}")
                    texts.append(row["text"])
            return "\n\n".join(texts)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e)[:100]}") from None


def tokenize_corpus(tok, path):
    return torch.tensor(tok.encode(read_corpus(path)), dtype=torch.long)


# -----------------------------------------------------------------------------
# named datasets: a local file ($BQ_DATA, then ../shared/data), the cache, then the Hugging Face hub

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(os.environ.get("BQ_SHARED", os.path.join(HERE, "..", "shared")), "data")

# (name, use) -> the local file and its label; the hub's standard split, its cache file and label.
# Calibration and evaluation texts are distinct: WikiText-2 test is never calibrated on.
DATASETS = {
    ("wikitext2", "eval"): (("wikitext2_test.txt", "WikiText-2 test"),
                            ("wikitext2_test.txt", "WikiText-2 test",
                             dict(path="wikitext", name="wikitext-2-raw-v1", split="test"))),
    ("wikitext2", "calib"): (("wikitext103_valid.txt", "WikiText-103 valid"),
                             ("wikitext2_train.txt", "WikiText-2 train",
                              dict(path="wikitext", name="wikitext-2-raw-v1", split="train"))),
    ("c4", "eval"): (("c4_eval.jsonl", "a C4-style sample, not the c4/en validation shard"),
                     ("c4_validation_00000.jsonl", "C4 en validation shard 00000",
                      dict(path="allenai/c4", split="validation",
                           data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}))),
    ("c4", "calib"): (("c4_calib.jsonl", "a C4 sample"),
                      ("c4_train_00000.jsonl", "C4 en train shard 00000 (GPTQ's)",
                       dict(path="allenai/c4", split="train",
                            data_files={"train": "en/c4-train.00000-of-01024.json.gz"}))),
}


def hub_rows(spec):
    """The `text` column of a Hugging Face dataset split, through the optional `datasets` package."""
    import datasets
    return datasets.load_dataset(**spec)["text"]


def find_dataset(name, use, hub=None):
    """(path, label) of a named dataset: $BQ_DATA, ../shared/data, the cache, then (hub given: a function
    spec -> rows of text) the Hugging Face hub, written once into the cache. Without hub: None when absent."""
    (local, local_label), (cached, hub_label, spec) = DATASETS[(name, use)]
    for root in (os.environ.get("BQ_DATA"), SHARED_DATA):
        for fname, label in ((local, local_label), (cached, hub_label)):
            if root and os.path.isfile(os.path.join(root, fname)):
                return os.path.join(root, fname), f"{fname}, {label}"
    out = os.path.join(llama.cache_dir(), "data", cached)
    if os.path.isfile(out):
        return out, f"{cached}, {hub_label}"
    if hub is None:
        return None
    where = f"put {local}{' or ' + cached if cached != local else ''} in $BQ_DATA"
    try:
        rows = hub(spec)
    except ImportError:
        raise UserError(f"{name} ({hub_label}) not found in $BQ_DATA, ../shared/data or the cache: "
                        f"`pip install datasets` to fetch it from the Hugging Face hub, or {where}") from None
    except Exception as e:
        raise UserError(f"could not fetch {name} ({hub_label}) from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e)[:120]}): connect to the network, or {where}") from None
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=f".{cached}.", suffix=".tmp")  # a file of its own:
    try:                                                        # runs fetching together never share one
        with open(fd, "w", encoding="utf-8") as f:              # the same layouts as the local files
            if out.endswith(".jsonl"):
                f.writelines(json.dumps(dict(text=t)) + "\n" for t in rows)
            else:
                f.write("\n\n".join(rows))
        llama.publish(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    say(f"fetched {name} ({hub_label}) from the Hugging Face hub into {out}")
    return out, f"{cached}, {hub_label}"


def resolve_data(arg, use):
    """A --data / --calib argument: a dataset name (fetched if need be) or a path. Returns (path, label)."""
    name = {"wikitext": "wikitext2"}.get(arg, arg)
    if name in ("wikitext2", "c4"):
        return find_dataset(name, use, hub=hub_rows)
    return arg, os.path.basename(arg)


def windows(ids, seqlen, limit=None):
    """(n, seqlen) non-overlapping windows from the start of the token stream; limit: the first n only."""
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = min(n, limit) if limit else n
    return ids[: n * seqlen].view(n, seqlen)


QUIET = False       # --quiet: no progress lines at all


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def progress_line(label, i, n, t0, what="", keep=True):
    """`label i/n what eta` as one self-overwriting line on a terminal; nothing when stderr is a file or a pipe, or
    with --quiet. keep: end the line at i == n (else the caller's next line overwrites it)."""
    if QUIET or not sys.stderr.isatty():
        return
    eta = (time.time() - t0) / max(i, 1) * (n - i)
    print(f"\r\033[K  {label} {i}/{n}  {what}  eta {fmt_time(eta)}", end="\n" if keep and i == n else "",
          file=sys.stderr, flush=True)


def say(*msg):
    """A status line on stderr unless --quiet (also in logs, unlike progress); on a terminal it replaces the
    progress line."""
    if not QUIET:
        print("\r\033[K" if sys.stderr.isatty() else "", *msg, sep="", file=sys.stderr, flush=True)


@torch.no_grad()
def token_nll(model, ids, seqlen=2048, limit=None, batch_size=1, progress=False):
    """Next-token negative log-likelihood of every prediction inside every window: (n * (seqlen - 1),) float64."""
    win = windows(ids, seqlen, limit)
    dev = next(model.parameters()).device
    out, t0 = [], time.time()
    for i in range(0, len(win), batch_size):
        x = win[i:i + batch_size].to(dev)
        logits = model(x)[:, :-1].float()
        out.append(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").double().cpu())
        if not torch.isfinite(out[-1]).all():
            raise UserError("the model produced a non-finite loss (NaN/inf logits)")
        if progress:
            done = min(i + batch_size, len(win))
            progress_line("window", done, len(win), t0, f"ppl {math.exp(torch.cat(out).mean()):.3f}")
    return torch.cat(out)


def perplexity(model, ids, seqlen=2048, limit=None, batch_size=1, progress=False):
    """exp( sum of NLL over every next-token prediction inside each window / their count )."""
    return math.exp(token_nll(model, ids, seqlen, limit, batch_size, progress).mean())


def mean_and_se(t):
    """(mean, standard error) of per-token values t (N,), as if the tokens were independent. Tokens inside a window
    are not, so this understates the spread; it is llama.cpp's estimate."""
    return t.mean().item(), t.std().item() / math.sqrt(t.numel())


def ppl_and_error(nll):
    """(perplexity, its standard error): exp(mean) with the delta method, se(ppl) = ppl * se(nll)."""
    m, se = mean_and_se(nll)
    return math.exp(m), math.exp(m) * se


@torch.no_grad()
def compare_many(ref, models, ids, seqlen=2048, limit=None, progress=False):
    """Every model against `ref` on the same windows, one window at a time, the reference's forward pass shared.
    KL(ref || model) per token = sum_v p_ref(v) (log p_ref(v) - log p_model(v)); top-1 agreement: argmax_v equal.
    Models after the first also get their difference from the first, paired per token (the same prediction under
    both): kl_diff = mean(KL_m - KL_0), nll_diff = mean(NLL_m - NLL_0) = log(ppl_m / ppl_0), each with its standard
    error, which is far smaller than the two rows' own errors because the windows' difficulty cancels.
    Returns a list of dicts, one per model."""
    win = windows(ids, seqlen, limit)
    dev_r = next(ref.parameters()).device
    kl, agree, nll = [[] for _ in models], [[] for _ in models], [[] for _ in models]
    nll_r, t0 = [], time.time()
    for i, x in enumerate(win):
        y = x[1:, None]
        lr = F.log_softmax(ref(x[None].to(dev_r))[0, :-1].float(), -1).cpu()           # (T-1, vocab)
        if not torch.isfinite(lr).all():
            raise UserError("the reference produced non-finite logits (NaN/inf)")
        nll_r.append(-lr.gather(-1, y)[:, 0].double())
        for j, model in enumerate(models):
            lm = F.log_softmax(model(x[None].to(next(model.parameters()).device))[0, :-1].float(), -1).cpu()
            if not torch.isfinite(lm).all():
                raise UserError("a model produced non-finite logits (NaN/inf)")
            kl[j].append(bq.kl_divergence(lr, lm).clamp_min(0).double())                # (T-1,)
            agree[j].append((lr.argmax(-1) == lm.argmax(-1)).double())
            nll[j].append(-lm.gather(-1, y)[:, 0].double())
        if progress:
            progress_line("window", i + 1, len(win), t0, " ".join(f"KL {torch.cat(k).mean():.4f}" for k in kl))
    ref_ppl, ref_ppl_se = ppl_and_error(torch.cat(nll_r))
    out = []
    for j in range(len(models)):
        k, a, n = torch.cat(kl[j]), torch.cat(agree[j]), torch.cat(nll[j])
        (ppl, ppl_se), (m_kl, se_kl), (m_top1, se_top1) = ppl_and_error(n), mean_and_se(k), mean_and_se(a)
        r = dict(windows=len(win), tokens=k.numel(), ppl=ppl, ppl_se=ppl_se, ref_ppl=ref_ppl, ref_ppl_se=ref_ppl_se,
                 kl=m_kl, kl_se=se_kl, kl_p99=torch.quantile(k.float(), 0.99).item(), top1=m_top1, top1_se=se_top1)
        if j:
            dk, dn = k - torch.cat(kl[0]), n - torch.cat(nll[0])
            (r["kl_diff"], r["kl_diff_se"]), (r["nll_diff"], r["nll_diff_se"]) = mean_and_se(dk), mean_and_se(dn)
        out.append(r)
    return out


def compare(ref, model, ids, seqlen=2048, limit=None, progress=False):
    """compare_many for one model: a dict."""
    return compare_many(ref, [model], ids, seqlen, limit, progress)[0]


# -----------------------------------------------------------------------------
# text sampled from the model: data-free calibration, and a quality report without a dataset

REPORT_SEED = 10007     # added to --seed for the report's held-out text: never the calibration's own samples


def sample_text(model, tok, nsamples, seqlen, seed, why):
    """(nsamples, seqlen) ids sampled from the model at temperature 1, all rows in one batch with the KV cache.
    Rows start at BOS (or a random token without one) and run to full length past any EOS, like documents
    concatenated in a corpus."""
    g = torch.Generator().manual_seed(seed)
    first = (torch.full((nsamples, 1), tok.bos_id) if tok.bos_id is not None else
             torch.randint(0, tok.n_vocab, (nsamples, 1), generator=g))
    say(f"sampling {nsamples} x {seqlen} tokens from the model ({why})")
    t0 = time.time()
    new = model.generate_batch(first, seqlen - 1, temperature=1.0, top_p=1.0, seed=seed, on_step=lambda i, n:
                               progress_line("sampling step", i, n, t0, f"{nsamples * i / (time.time() - t0):.0f} tok/s"))
    dt = time.time() - t0
    say(f"sampled {nsamples * seqlen} tokens in {fmt_time(dt)} ({nsamples * (seqlen - 1) / dt:.0f} tokens/s)")
    return torch.cat([first, new], 1)


def sampled_report(ref, model, tok, nsamples, seqlen, seed):
    """No evaluation text: compare() on held-out text sampled from the unquantized `ref` with seed + REPORT_SEED.
    The perplexities are on model-sampled text (ref's is about its own entropy there), not a benchmark's."""
    ids = sample_text(ref, tok, nsamples, seqlen, seed + REPORT_SEED, "held-out text for the quality report")
    return dict(compare(ref, model, ids.flatten(), seqlen, progress=True), seed=seed + REPORT_SEED, seqlen=seqlen)


# -----------------------------------------------------------------------------
# speed: greedy decode with the KV cache, batch 1

@torch.no_grad()
def decode_speed(model, prompt_len=16, tokens=128):
    """Decoded tokens per second (greedy, KV cache, batch 1) after one warm-up; prompt: token ids 1..prompt_len."""
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ids = list(range(1, prompt_len + 1))
    model.generate(ids, 8, temperature=0)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, tokens, temperature=0)
    sync()
    return len(out) / (time.perf_counter() - t0)


def main():
    p = llama.ArgumentParser(description="Perplexity, KL divergence and decode speed of a checkpoint or calibrated file.")
    p.add_argument("--ckpt", nargs="+", default=["smollm2-135m"],
                   help="named checkpoint, directory, .gguf or calibrated .safetensors; several are evaluated on the same "
                        "windows (held in memory together, the --ref pass shared), each after the first also paired "
                        "per token against the first")
    p.add_argument("--ref", default=None, help="reference checkpoint for KL divergence and top-1 agreement")
    p.add_argument("--data", nargs="+", default=["wikitext2"],
                   help="files (.txt, .jsonl), or wikitext2 (WikiText-2 test) or c4 (en validation shard 00000; locally "
                        "c4_eval.jsonl, a C4-style sample), found in $BQ_DATA, ../shared/data, the cache, then the "
                        "Hugging Face hub (needs `pip install datasets`)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="append a JSON line of results to this file")
    p.add_argument("--speed", action="store_true", help="decode tokens/s instead of quality; a calibrated file is "
                                                       "timed beside the checkpoint it was made from")
    p.add_argument("--tokens", type=int, default=128, help="tokens to decode for --speed")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args()
    global QUIET
    QUIET = a.quiet
    if a.seqlen < 2 or (a.limit is not None and a.limit < 1) or a.batch_size < 1 or a.tokens < 1:
        raise UserError("--seqlen must be >= 2 (a window predicts seqlen - 1 tokens); --limit, --batch_size and "
                        "--tokens >= 1")
    llama.check_device(a.device)
    data = [] if a.speed else [resolve_data(d, "eval") for d in a.data]     # a missing dataset fails before loading
    if a.out is not None:       # the data as resolved: --data c4 names a file too
        llama.check_output(a.out, [*a.ckpt, a.ref] + [d for d in a.data if os.path.exists(d)] + [p for p, _ in data])
        if os.path.isfile(a.out) and os.path.getsize(a.out):    # appended to: it must already be JSON lines
            with open(a.out, "rb") as f:
                first = f.read(1 << 16).split(b"\n", 1)[0]
            try:
                assert isinstance(json.loads(first), dict)
            except (ValueError, AssertionError):
                raise UserError(f"--out {a.out} exists and is not a JSON-lines file: refusing to append to it") from None
    dtype = getattr(torch, a.dtype)
    corpora = [read_corpus(path) for path, _ in data]                       # bad data fails before the model loads
    if len({os.path.realpath(c) if os.path.exists(c) else c for c in a.ckpt}) < len(a.ckpt):
        raise UserError("--ckpt names a checkpoint twice")
    models, tok = [], None
    for ckpt in a.ckpt:
        model, t = llama.load(ckpt)
        if t is None:
            raise UserError(f"{ckpt}: no tokenizer found beside the checkpoint")
        if tok is None:
            tok = t
        elif not a.speed and (model.args.vocab_size != models[0].args.vocab_size or
                              t.encode(corpora[0][:20000]) != tok.encode(corpora[0][:20000])):
            raise UserError(f"{ckpt}: its tokenizer differs from {a.ckpt[0]}'s: the models cannot share windows")
        models.append(model)
    ctx = min(m.args.max_seq_len for m in models)
    if (a.speed and 16 + a.tokens > ctx) or (not a.speed and a.seqlen > ctx):
        raise UserError(f"{f'16 + --tokens {a.tokens}' if a.speed else f'--seqlen {a.seqlen}'}: beyond the model's "
                        f"context of {ctx} tokens")
    llama.check_memory(min(a.batch_size, a.limit or a.batch_size) * a.seqlen * models[0].args.vocab_size * 4 * 3,
                       "a batch of logits")
    models = [m.to(a.device, dtype) for m in models]
    results = []
    if a.speed:
        pairs = []
        for ckpt, model in zip(a.ckpt, models):
            if ckpt.endswith(".safetensors"):
                sett = llama.read_safetensors(ckpt)[0].get("settings")
                src = sett.get("ckpt") if isinstance(sett, dict) else None
                if src and src not in a.ckpt and src not in [name for name, _ in pairs]:
                    pairs.append((src, llama.load(src)[0].to(a.device, dtype)))
            pairs.append((ckpt, model))
        for name, m in pairs:
            tps = decode_speed(m, tokens=a.tokens)
            print(f"{name}: {tps:.1f} tokens/s ({a.dtype}, {a.device}, greedy, batch 1)")
            results.append(dict(ckpt=name, tokens_per_s=round(tps, 2), dtype=a.dtype, device=a.device))
    else:
        ref = llama.load(a.ref)[0].to(a.device, dtype) if a.ref else None
        if ref is not None and ref.args.vocab_size != models[0].args.vocab_size:
            raise UserError(f"--ref {a.ref}: vocabulary {ref.args.vocab_size}, the model's is {models[0].args.vocab_size}")
        ids_all = [torch.tensor(tok.encode(text), dtype=torch.long) for text in corpora]
        for ids in ids_all:
            windows(ids, a.seqlen, a.limit)     # every file holds a window before any is evaluated
        for (path, label), ids in zip(data, ids_all):
            t0 = time.time()
            if ref is None:
                nlls = [token_nll(m, ids, a.seqlen, a.limit, a.batch_size, progress=True) for m in models]
                rows = []
                for j, nll in enumerate(nlls):
                    ppl, se = ppl_and_error(nll)
                    rows.append(dict(ppl=ppl, ppl_se=se, windows=len(windows(ids, a.seqlen, a.limit))))
                    if j:
                        rows[-1]["nll_diff"], rows[-1]["nll_diff_se"] = mean_and_se(nll - nlls[0])
            else:
                rows = compare_many(ref, models, ids, a.seqlen, a.limit, progress=True)
            for j, (ckpt, res) in enumerate(zip(a.ckpt, rows)):
                res = {k: round(v, 6) if isinstance(v, float) else v for k, v in res.items()}
                who = f"{ckpt}: " if len(models) > 1 else ""
                if ref is None:
                    print(f"{who}{label}: ppl {res['ppl']:.4f} ± {res['ppl_se']:.4f} ({res['windows']} windows of {a.seqlen})")
                else:
                    print(f"{who}{label}: ppl {res['ppl']:.4f} ± {res['ppl_se']:.4f} (reference "
                          f"{res['ref_ppl']:.4f}), KL {res['kl']:.5f} ± {res['kl_se']:.5f}, KL p99 {res['kl_p99']:.4f}, "
                          f"top-1 agreement {100 * res['top1']:.2f}% ({res['windows']} windows of {a.seqlen})")
                if j:
                    print(f"    against {a.ckpt[0]}, paired per token: ppl x{math.exp(res['nll_diff']):.4f} (log "
                          f"{res['nll_diff']:+.5f} ± {res['nll_diff_se']:.5f})" +
                          (f", KL {res['kl_diff']:+.5f} ± {res['kl_diff_se']:.5f}" if ref is not None else ""))
                results.append(dict(ckpt=ckpt, ref=a.ref, data=os.path.basename(path), seqlen=a.seqlen, dtype=a.dtype,
                                    seconds=round(time.time() - t0, 1), **({"paired_with": a.ckpt[0]} if j else {}), **res))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for r in results:
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        else:
            print(json.dumps(r))


if __name__ == "__main__":
    llama.cli(main)
