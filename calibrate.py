"""
Learn one transform per linear-input site, block by block, then quantize the rotated weights.

    python calibrate.py                                  # SmolLM2-135M, learned butterflies, W3 g128 GPTQ
    python calibrate.py --ckpt llama-2-7b --bits 2 --group 128
    python calibrate.py --rotation hadamard              # QuaRot-style fixed randomised Hadamard baseline
    python calibrate.py --sweep [--sweep_only w2g64]     # the results grid (resumable, out/sweep.jsonl)

For each block, in order:
  1. collect: run the calibration tokens through the blocks already quantized and keep, at each of the four
     sites (q/k/v input, wo input, w1/w3 input, w2 input), H = X X^T / N and a few tokens X_u;
  2. learn and quantize: T per site (butterflyquant.learn_transform), then Q(W T^T) with the final quantizer
     (GPTQ on T H T^T, or RTN with clip search); the block becomes its quantized self (llama.install_quantized_block);
  3. write: the block's tensors to OUT.partial/ (a killed run resumes there), and at the end the whole file.
The same code path runs the baselines (--rotation none / hadamard / random), so the comparison is fair.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

# idle OpenMP threads sleep instead of spinning: where other jobs share the 2 cores, spinning made a decode step
# 6x slower (38 s vs 6 s for 8 steps at batch 16 on SmolLM2). It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

import butterflyquant as bq
import eval as evaluation
import llama
from llama import SITES, UserError

SHARED_DATA = evaluation.SHARED_DATA
DATA_FREE_CPU = (16, 512)     # nsamples, seqlen sampled on a CPU without calibration text: the first run in minutes
REPORT_CPU, REPORT_GPU = (8, 512), (32, 2048)     # the quality report's sampled text when no evaluation text is found
SHORT = {"attention.rot_qkv": "qkv", "attention.rot_o": "o", "feed_forward.rot_up": "up", "feed_forward.rot_down": "down"}


@dataclass
class CalibConfig:
    ckpt: str = "smollm2-135m"
    rotation: str = "butterfly"         # none | hadamard | random | butterfly (learned)
    calib: Optional[str] = None         # .txt / .jsonl, wikitext2 or c4; None: local WikiText-103 or data-free
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    unif_tokens: int = 256              # tokens per site kept for the uniformity regulariser
    batch_size: int = 4                 # samples per forward pass (does not change the result)
    device: str = "cpu"                 # (does not change the result beyond float rounding)


def settings(cc, qc, lc):
    """Everything that determines the result: the resume check and the file header."""
    d = {k: v for k, v in asdict(cc).items() if k not in ("batch_size", "device")}
    return dict(d, quant=asdict(qc), learn=asdict(lc) if cc.rotation == "butterfly" else None)


# -----------------------------------------------------------------------------
# calibration data

def calibration_samples(cc, model, tok):
    """(nsamples random windows of seqlen tokens (N, T), a description of their source)."""
    found = evaluation.resolve_data(cc.calib, "calib") if cc.calib else evaluation.find_dataset("wikitext2", "calib")
    if found is None:   # on the device: sampling is most of a data-free run's forward passes
        ids = evaluation.sample_text(model.to(cc.device), tok, cc.nsamples, cc.seqlen, cc.seed, "data-free calibration")
        model.cpu()
        return ids, "data-free: sampled from the model"
    path, label = found
    g = torch.Generator().manual_seed(cc.seed)
    ids = evaluation.tokenize_corpus(tok, path)
    if ids.numel() and ids.max() >= model.args.vocab_size:
        raise UserError(f"the tokenizer produces id {int(ids.max())}, beyond the model's vocabulary ({model.args.vocab_size})")
    if ids.numel() <= cc.seqlen:
        raise UserError(f"{path}: {ids.numel()} tokens, fewer than one sample of --seqlen {cc.seqlen}")
    starts = torch.randint(0, ids.numel() - cc.seqlen, (cc.nsamples,), generator=g)
    return torch.stack([ids[s:s + cc.seqlen] for s in starts.tolist()]), f"{label} ({ids.numel()} tokens)"


# -----------------------------------------------------------------------------
# one block: collect, learn and quantize

@torch.no_grad()
def run_block(block, X, cos, sin, cc, capture=False, label=""):
    """X (N, T, dim) on CPU -> block(X). capture: also, per site, H = sum x x^T / count and a token subsample.
    label: the progress line's."""
    dev = cc.device
    stats, hooks = {}, []
    if capture:
        g = torch.Generator().manual_seed(cc.seed + 7)
        for slot, linears in SITES:
            n = block.get_submodule(linears[0]).in_features
            st = stats[slot] = dict(H=torch.zeros(n, n, dtype=torch.float64, device=dev), count=0, sub=[])

            def hook(mod, inp, st=st):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                st["H"] += (x.T @ x).double()
                st["count"] += x.shape[0]
                k = max(1, cc.unif_tokens * x.shape[0] // (cc.nsamples * cc.seqlen))
                st["sub"].append(x[torch.randint(0, x.shape[0], (k,), generator=g).to(dev)].float().cpu())
            hooks.append(block.get_submodule(linears[0]).register_forward_pre_hook(hook))
    out, t0 = torch.empty_like(X), time.time()
    try:
        for i in range(0, X.shape[0], cc.batch_size):
            out[i:i + cc.batch_size] = block(X[i:i + cc.batch_size].to(dev), cos, sin).cpu()
            evaluation.progress_line(label, min(i + cc.batch_size, len(X)), len(X), t0, "samples", keep=False)
    finally:
        for h in hooks:
            h.remove()
    if not torch.isfinite(out).all():
        raise UserError("non-finite activations (NaN/inf) in the calibration forward pass: check the checkpoint")
    for st in stats.values():
        st["H"] = (st["H"] / st["count"]).float()
        st["sub"] = torch.cat(st["sub"])[: cc.unif_tokens].to(dev)
    return out, stats


def quantize_block(block, stats, cc, qc, lc, layer):
    """Choose T and quantize Q(W T^T) at every site of one block, then install the quantized block.
    Returns (the block's tensors, {slot: transform entry}, {site: relative layer loss before and after})."""
    tensors, entries, log, t0 = {}, {}, {}, time.time()
    for s_i, (slot, linears) in enumerate(SITES):
        evaluation.progress_line(f"block {layer + 1}: learning and quantizing site", s_i + 1, len(SITES), t0,
                                 SHORT[slot], keep=False)
        seed = cc.seed * 1000003 + 4 * layer + s_i
        Ws = [block.get_submodule(name).weight.detach().to(cc.device, torch.float32) for name in linears]
        W = torch.cat(Ws)                           # (sum of outs, n): linears sharing an input share T
        n, H = W.shape[1], stats[slot]["H"]
        first = float("nan")
        if cc.rotation == "butterfly":
            try:
                T, first, after, (q, s, z) = bq.learn_transform(W, H, qc, lc, seed, stats[slot]["sub"])
            except bq.LearningError as e:
                raise UserError(f"{e}: lower --lr") from None
            entries[slot], tensors[f"{slot}.theta"], Q = T.export()
            if Q is not None:
                tensors[f"{slot}.Q"] = Q
            M = T.matrix().detach()
        else:
            if cc.rotation == "none":
                M = torch.eye(n, device=cc.device)
            else:
                entries[slot] = dict(n=n, dense=True, kind=cc.rotation, seed=seed)
                M = bq.fixed_matrix(n, cc.rotation, seed).to(cc.device)
            after, (q, s, z) = bq.score(W, H, M, qc, ((W @ H) * W).sum())
        row = 0
        for name, Wl in zip(linears, Ws):
            rows = slice(row, row + Wl.shape[0])
            tensors[f"{name}.qweight"] = bq.pack(q[rows], qc.bits).cpu()
            tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = s[rows].half().cpu(), z[rows].half().cpu()
            row += Wl.shape[0]
        log[SHORT[slot]] = dict(start=round(first, 5), final=round(after, 5))
    tensors["attention_norm.weight"] = block.attention_norm.weight.detach().float().cpu()
    tensors["ffn_norm.weight"] = block.ffn_norm.weight.detach().float().cpu()
    llama.install_quantized_block(block, tensors, entries, qc.bits, qc.group)
    return tensors, entries, log


# -----------------------------------------------------------------------------
# the driver: collect -> learn and quantize a block -> write, resumable

def calibrate(cc: CalibConfig, qc: bq.QuantConfig, lc: bq.LearnConfig, out):
    """Calibrate cc.ckpt and write `out`; returns a summary dict. OUT.partial/ keeps finished blocks."""
    torch.manual_seed(cc.seed)
    t_start = time.time()
    model, tok = llama.load(cc.ckpt)
    if tok is None:
        raise UserError(f"{cc.ckpt}: no tokenizer found beside the checkpoint")
    args = model.args
    samples, source = calibration_samples(cc, model, tok)               # (N, T)
    partial = out + ".partial"
    sett = settings(cc, qc, lc)
    if os.path.isdir(partial):
        try:
            old = json.load(open(os.path.join(partial, "settings.json")))
        except (OSError, ValueError):
            old = None
        if old != sett:
            raise UserError(f"{partial} holds a run with other settings; delete it or rerun with the same arguments")
        print(f"resuming from {partial}", file=sys.stderr)
    else:
        os.makedirs(partial)
        with open(os.path.join(partial, "settings.json.tmp"), "w") as f:
            json.dump(sett, f)
        os.replace(os.path.join(partial, "settings.json.tmp"), os.path.join(partial, "settings.json"))

    dev = cc.device
    print(f"calibrating {cc.ckpt}: {args.n_layers} blocks, dim {args.dim}, ffn {args.hidden_dim} | W{qc.bits} "
          f"g{qc.group}{' sym' if qc.sym else ''} {'GPTQ' if qc.gptq else 'RTN'}{'+clip' if qc.clip else ''} | "
          f"rotation {cc.rotation}{'(' + lc.init + ')' if cc.rotation == 'butterfly' else ''} | "
          f"{cc.nsamples}x{cc.seqlen} tokens of {source} | {dev}", file=sys.stderr)
    with torch.no_grad():
        X = model.tok_embeddings(samples).float()                       # (N, T, dim) on CPU
    cos, sin = model.rope(0, cc.seqlen, dev)
    site_log, t_blocks, done_now = {}, time.time(), 0
    for l, block in enumerate(model.layers):
        bpath = os.path.join(partial, f"block_{l:03d}.safetensors")
        t0 = time.time()
        block.to(dev, torch.float32)
        if os.path.isfile(bpath):       # finished in an earlier run: rebuild it and move on
            header, tensors = llama.read_safetensors(bpath)
            try:
                llama.install_quantized_block(block, tensors, header["transforms"], qc.bits, qc.group)
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{bpath}: {e}; delete {partial} to start over") from None
            block.to(dev)
            X, _ = run_block(block, X, cos, sin, cc, label=f"block {l + 1}: forward (resumed)")
            block.cpu()
            site_log.update({f"layers.{l}.{k}": v for k, v in header["log"].items()})
            continue
        _, stats = run_block(block, X, cos, sin, cc, capture=True, label=f"block {l + 1}: collecting H")
        tensors, entries, log = quantize_block(block, stats, cc, qc, lc, l)
        del stats
        block.to(dev)
        X, _ = run_block(block, X, cos, sin, cc, label=f"block {l + 1}: forward, quantized")   # the next inputs
        llama.write_safetensors(bpath, tensors, dict(transforms=entries, log=log))
        block.cpu()
        site_log.update({f"layers.{l}.{k}": v for k, v in log.items()})
        done_now += 1
        eta = (time.time() - t_blocks) / done_now * (args.n_layers - l - 1)
        bar = "#" * round(20 * (l + 1) / args.n_layers)
        sites = "  ".join(f"{k} {v['start']:.3f}->{v['final']:.3f}" if cc.rotation == "butterfly" else
                          f"{k} {v['final']:.3f}" for k, v in log.items())
        evaluation.say(f"block {l + 1:3d}/{args.n_layers} |{bar:<20}| {sites} | {time.time() - t0:5.1f}s "
                       f"eta {evaluation.fmt_time(eta)}")
    t_cal = time.time() - t_start

    packed = [m for m in model.modules() if m.__class__.__name__ == "QuantLinear"]
    numel = sum(m.in_features * m.out_features for m in packed)
    bpw = sum(bq.stored_bits_per_weight(m.qweight, m.scales, m.zeros, 1) for m in packed) / numel
    finals = [v["final"] for v in site_log.values()]
    llama.save_quantized(out, model, tok, dict(bits=qc.bits, group=qc.group, sym=qc.sym), settings=sett,
                         calib_source=source, data_free=source.startswith("data-free"), log=site_log,
                         bits_per_weight=round(bpw, 4), calibration_seconds=round(t_cal, 1), device=dev)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"\nwrote {out}: {os.path.getsize(out) / 2 ** 20:.1f} MiB, {bpw:.3f} bits per packed weight "
          f"({numel / 1e6:.1f}M weights)", file=sys.stderr)
    print(f"calibration {evaluation.fmt_time(t_cal)} on {dev} ({source}); mean relative layer loss "
          f"{sum(finals) / len(finals):.4f}", file=sys.stderr)
    return dict(out=out, bits_per_weight=round(bpw, 4), calibration_seconds=round(t_cal, 1),
                mean_layer_loss=round(sum(finals) / len(finals), 5), calib_source=source, settings=sett)


# -----------------------------------------------------------------------------
# the results grid, as data: (row name, settings that differ from the command line's)

SWEEP_QUANT = [(2, 128), (2, 64), (3, 128), (4, 128)]
SWEEP_ROT = [("none", {}), ("hadamard", {}), ("random", {}), ("butterfly-identity", dict(init="identity")),
             ("butterfly-hadamard", dict(init="hadamard")), ("butterfly-best", dict(init="best")),
             ("butterfly-best-0.1", dict(init="best", lambda_unif=0.1))]
SWEEP = [(f"w{b}g{g}-{q}-{name}", dict(bits=b, group=g, gptq=q == "gptq", rotation=name.split("-")[0], **learn))
         for b, g in SWEEP_QUANT for q in ("rtn", "gptq") for name, learn in SWEEP_ROT]


def sweep_rows(only=()):
    """The grid's rows (fp first) that `only` selects: a full row name selects itself alone
    (w2g64-rtn-butterfly-best is not w2g64-rtn-butterfly-best-0.1); any other string matches as a substring."""
    tags = {t for t, _ in SWEEP}
    return [("fp", None)] + [(t, x) for t, x in SWEEP if not only or any(o == t if o in tags else o in t for o in only)]


def sweep(cc, qc, lc, only, eval_files, eval_limit, path=os.path.join("out", "sweep.jsonl")):
    """Every selected row through calibrate() and the same evaluation; finished rows are kept in `path`."""
    done = {}
    if os.path.isfile(path):
        for line in open(path):
            r = json.loads(line)
            done[r["tag"]] = r
    for tag, row in sweep_rows(only):
        if tag in done:
            continue
        if row is None:
            model, tok = llama.load(cc.ckpt)
            secs, bpw = 0.0, 16.0
        else:
            qrow = replace(qc, **{k: v for k, v in row.items() if k in ("bits", "group", "gptq")})
            lrow = replace(lc, **{k: v for k, v in row.items() if k in ("init", "lambda_unif")})
            res = calibrate(replace(cc, rotation=row["rotation"]), qrow, lrow,
                            os.path.join("out", f"sweep-{tag}.safetensors"))
            model, tok = llama.load(res["out"])
            secs, bpw = res["calibration_seconds"], res["bits_per_weight"]
        model.to(cc.device)
        r = dict(tag=tag, bits_per_weight=bpw, calibration_seconds=secs, device=cc.device, nsamples=cc.nsamples,
                 eval_limit=eval_limit)
        for f in eval_files:
            ids = evaluation.tokenize_corpus(tok, f)
            r[os.path.basename(f)] = round(evaluation.perplexity(model, ids, cc.seqlen, eval_limit), 3)
        print(json.dumps(r), flush=True)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        done[tag] = r
        del model
    names = [os.path.basename(f) for f in eval_files]
    print("\n| config | " + " | ".join(names) + " | bits/weight | calib s |\n|---|" + "---|" * (len(names) + 2))
    for tag, r in done.items():
        print(f"| {tag} | " + " | ".join(str(r.get(n, "-")) for n in names) +
              f" | {r['bits_per_weight']} | {r['calibration_seconds']} |")


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    """Flags -> (CalibConfig, QuantConfig, LearnConfig, the other options)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m", help="named checkpoint, Meta/HF directory or .gguf")
    p.add_argument("--out", default=None, help="output .safetensors (default: out/<ckpt>-<settings>.safetensors)")
    p.add_argument("--rotation", default="butterfly", choices=["none", "hadamard", "random", "butterfly"])
    p.add_argument("--init", default="best", choices=["identity", "hadamard", "random", "best"],
                   help="butterfly start; 'best' starts from the better of identity and hadamard per site")
    p.add_argument("--bits", "--w_bits", "--wbits", type=int, default=3, help="weight bits (2, 3, 4, 8)")
    p.add_argument("--group", "--w_groupsize", type=int, default=128, help="group size; 0 or -1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (default asymmetric)")
    p.add_argument("--no_clip", action="store_true", help="min-max range instead of the MSE clip search")
    p.add_argument("--gptq", action="store_true", default=True, help="GPTQ on the rotated weights (default)")
    p.add_argument("--rtn", "--w_rtn", dest="gptq", action="store_false", help="round to nearest instead of GPTQ")
    p.add_argument("--act_order", action="store_true", help="GPTQ column order by decreasing H diagonal")
    p.add_argument("--calib", "--cal_dataset", default=None,
                   help="calibration text (.txt or .jsonl), or wikitext2 (WikiText-103 valid locally, else WikiText-2 "
                        "train) or c4 (en train shard 00000), found in $BQ_DATA, ../shared/data, the cache, then the "
                        "Hugging Face hub (needs `pip install datasets`); default: local WikiText-103 valid, else "
                        "data-free: text sampled from the model itself")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration samples (default: 128, the paper's, on a GPU; 32 on CPU, where 128 x 2048 "
                        "tokens take ~40 minutes of forward passes for SmolLM2 on 2 cores; data-free on CPU: %d)"
                        % DATA_FREE_CPU[0])
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per sample and per evaluation window (default 2048; data-free on CPU: %d)"
                        % DATA_FREE_CPU[1])
    p.add_argument("--steps", type=int, default=30, help="optimisation steps per site")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--rows", type=int, default=512, help="output rows per step (stochastic); 0 = all")
    p.add_argument("--checkpoints", type=int, default=1, help="times per site the iterate is scored with the "
                                                                    "final quantizer (the best is kept)")
    p.add_argument("--optim", default="sgd", choices=["sgd", "adam"], help="sgd = momentum 0.9; both cosine-decayed")
    p.add_argument("--lambda_unif", type=float, default=0.0, help="weight of the uniformity regulariser")
    p.add_argument("--unif_tokens", type=int, default=256, help="tokens per site kept for the regulariser")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=4, help="calibration samples per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval_data", nargs="*", default=None,
                   help="perplexity data after calibration: files, wikitext2 or c4 (default: local WikiText-2 test "
                        "if found, else a report on text sampled from the unquantized model)")
    p.add_argument("--eval_limit", type=int, default=None,
                   help="first N windows only (default: all on a GPU, 16 on CPU where all 148 take ~13 min per model)")
    p.add_argument("--no_eval", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines (sampling, blocks, windows)")
    p.add_argument("--sweep", action="store_true", help="run the README's results grid (resumable, out/sweep.jsonl)")
    p.add_argument("--sweep_only", default=None,
                   help="comma-separated sweep rows to run: full row names, or substrings such as w2g64")
    a = p.parse_args(argv)
    on_gpu = a.device.startswith("cuda")
    data_free_cpu = not on_gpu and a.calib is None and evaluation.find_dataset("wikitext2", "calib") is None
    nsamples = a.nsamples or (128 if on_gpu else DATA_FREE_CPU[0] if data_free_cpu else 32)
    seqlen = a.seqlen or (DATA_FREE_CPU[1] if data_free_cpu else 2048)
    cc = CalibConfig(a.ckpt, a.rotation, a.calib, nsamples, seqlen, a.seed, a.unif_tokens, a.batch_size, a.device)
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(cc, name) < 1:
            raise UserError(f"--{name} must be positive")
    try:
        qc = bq.QuantConfig(a.bits, 0 if a.group == -1 else a.group, a.sym, not a.no_clip, a.gptq, a.act_order)
        lc = bq.LearnConfig(a.init, a.steps, a.lr, a.rows, a.checkpoints, a.optim, a.lambda_unif)
    except ValueError as e:
        raise UserError(str(e)) from None
    if a.out is None:
        tag = cc.rotation if cc.rotation != "butterfly" else f"bf-{lc.init}"
        a.out = os.path.join("out", f"{os.path.basename(cc.ckpt.rstrip('/')).replace('.gguf', '')}-w{qc.bits}"
                                    f"g{qc.group}-{tag}-{'gptq' if qc.gptq else 'rtn'}"
                                    f"{'-u' + str(lc.lambda_unif) if lc.lambda_unif else ''}.safetensors")
    eval_limit = a.eval_limit if a.eval_limit is not None else (None if on_gpu else 16)
    opts = dict(out=a.out, eval_data=a.eval_data, eval_limit=eval_limit or None, no_eval=a.no_eval, quiet=a.quiet,
                eval_seqlen=a.seqlen or 2048, report=REPORT_GPU if on_gpu else REPORT_CPU,
                sweep=a.sweep, sweep_only=[t for t in (a.sweep_only or "").split(",") if t])
    return cc, qc, lc, opts


def main(argv=None):
    cc, qc, lc, o = parse_args(sys.argv[1:] if argv is None else argv)
    evaluation.QUIET = o["quiet"]
    if not os.path.exists(cc.ckpt) and cc.ckpt not in llama.NAMED:
        llama.resolve_ckpt(cc.ckpt)     # one clear line for an unknown name
    if cc.calib is not None and not os.path.isfile(evaluation.resolve_data(cc.calib, "calib")[0]):
        raise UserError(f"calibration file not found: {cc.calib}")
    if o["sweep"]:
        files = o["eval_data"] if o["eval_data"] is not None else [
            os.path.join(SHARED_DATA, f) for f in ("wikitext2_test.txt", "c4_eval.jsonl")]
        return sweep(cc, qc, lc, o["sweep_only"], files, o["eval_limit"])
    found = evaluation.find_dataset("wikitext2", "eval")
    data = ([] if o["no_eval"] else [evaluation.resolve_data(d, "eval") for d in o["eval_data"]]
            if o["eval_data"] is not None else [found] if found else [])
    for path, _ in data:
        evaluation.read_corpus(path)        # fail now, not after calibrating
    res = calibrate(cc, qc, lc, o["out"])
    if o["no_eval"] or (o["eval_data"] is not None and not data):
        print(json.dumps(res))
        return res
    fp_model, _ = llama.load(cc.ckpt)
    qmodel, qtok = llama.load(o["out"])                 # the saved file, through the real loading path
    fp_model.to(cc.device)
    qmodel.to(cc.device)
    T = o["eval_seqlen"]
    for path, label in data:
        ids = evaluation.tokenize_corpus(qtok, path)
        fp = evaluation.perplexity(fp_model, ids, T, o["eval_limit"], progress=True)
        qp = evaluation.perplexity(qmodel, ids, T, o["eval_limit"], progress=True)
        nwin = min(ids.numel() // T, o["eval_limit"] or 10 ** 9)
        name = os.path.basename(path)
        print(f"{label}: perplexity {qp:.3f} quantized vs {fp:.3f} unquantized ({nwin} windows of {T})",
              file=sys.stderr)
        res[f"ppl_{name}"], res[f"fp_ppl_{name}"], res["eval_windows"] = round(qp, 4), round(fp, 4), nwin
    if not data:    # no evaluation text anywhere: the quality on text the unquantized model writes
        n, T = o["report"]
        r = evaluation.sampled_report(fp_model, qmodel, qtok, n, T, cc.seed)
        print(f"no evaluation text found; on {n} x {T} tokens sampled from the unquantized model (seed {r['seed']}): "
              f"perplexity {r['ppl']:.3f} quantized vs {r['ref_ppl']:.3f} unquantized, KL {r['kl']:.4f} ± "
              f"{r['kl_se']:.4f} (p99 {r['kl_p99']:.3f}), top-1 agreement {100 * r['top1']:.1f}% (model-sampled "
              f"text, not a benchmark)", file=sys.stderr)
        res["sampled_report"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    llama.cli(main)
