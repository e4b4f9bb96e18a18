"""
Learn one butterfly transform per linear-input site, block by block, then quantize the rotated weights.

    python calibrate.py                                  # SmolLM2-135M, learned butterflies, defaults below
    python calibrate.py --ckpt llama-2-7b --bits 2 --group 128 --gptq
    python calibrate.py --rotation hadamard --gptq       # QuaRot-style fixed randomised Hadamard baseline

For each block, in order:
  1. run the calibration tokens through the blocks already quantized, and at each of the four sites
     (q/k/v input, wo input, w1/w3 input, w2 input) keep H = X X^T / N and a few tokens X_u;
  2. learn T = Q_K (x) Butterfly(m) minimising  trace(E H E^T) / trace(W H W^T) + lambda * KL(hist(T X_u) || U),
     E = W - Q(W T^T) T, with Q the straight-through RTN quantizer (the trace form makes a step O(out n^2));
  3. store Q(W T^T) (RTN with clip search, or GPTQ on T H T^T), packed; T runs online at inference.
The same code path runs the baselines (--rotation none / hadamard / random), so the comparison is fair.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import torch

import butterflyquant as bq
import eval as evaluation
import llama
from kernels import OnlineTransform, QuantLinear, fixed_matrix
from llama import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(os.environ.get("BQ_SHARED", os.path.join(HERE, "..", "shared")), "data")

# (transform slot, the linears that read its output)
SITES = [("attention.rot_qkv", ("attention.wq", "attention.wk", "attention.wv")),
         ("attention.rot_o", ("attention.wo",)),
         ("feed_forward.rot_up", ("feed_forward.w1", "feed_forward.w3")),
         ("feed_forward.rot_down", ("feed_forward.w2",))]
SHORT = {"attention.rot_qkv": "qkv", "attention.rot_o": "o", "feed_forward.rot_up": "up", "feed_forward.rot_down": "down"}


def parse_args(argv=None):
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
                   help="calibration text (.txt or .jsonl; 'wikitext2' or 'c4' name the ../shared files); "
                        "default: ../shared WikiText-103 valid, else text sampled from the model itself")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration samples (default: 128, the paper's, on a GPU; 32 on CPU, where 128 x 2048 "
                        "tokens take ~40 minutes of forward passes for SmolLM2 on 2 cores)")
    p.add_argument("--seqlen", type=int, default=2048)
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
                   help="perplexity data after calibration (default: ../shared WikiText-2 test if present)")
    p.add_argument("--eval_limit", type=int, default=None,
                   help="first N windows only (default: all on a GPU, 16 on CPU where all 148 take ~13 min per model)")
    p.add_argument("--no_eval", action="store_true")
    p.add_argument("--sweep", action="store_true", help="run the README's results grid (resumable, out/sweep.jsonl)")
    p.add_argument("--sweep_only", default=None,
                   help="comma-separated sweep rows to run: full row names, or substrings such as w2g64")
    a = p.parse_args(argv)
    if a.group == -1:
        a.group = 0
    on_gpu = a.device.startswith("cuda")
    if a.nsamples is None:
        a.nsamples = 128 if on_gpu else 32
    if a.eval_limit is None and not on_gpu:
        a.eval_limit = 16
    if a.eval_limit == 0:
        a.eval_limit = None
    try:
        a.qcfg = bq.QuantConfig(a.bits, a.group, a.sym, not a.no_clip)
    except ValueError as e:
        raise UserError(str(e)) from None
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name} must be positive")
    if a.steps < 0 or not math.isfinite(a.lr) or a.lr <= 0:
        raise UserError("--steps must be >= 0 and --lr positive")
    if a.calib in ("wikitext2", "wikitext"):
        a.calib = os.path.join(SHARED_DATA, "wikitext103_valid.txt")
    elif a.calib == "c4":
        a.calib = os.path.join(SHARED_DATA, "c4_calib.jsonl")
    if a.out is None:
        tag = a.rotation if a.rotation != "butterfly" else f"bf-{a.init}"
        a.out = os.path.join("out", f"{os.path.basename(a.ckpt.rstrip('/')).replace('.gguf', '')}-w{a.bits}g{a.group}"
                                    f"-{tag}-{'gptq' if a.gptq else 'rtn'}"
                                    f"{'-u' + str(a.lambda_unif) if a.lambda_unif else ''}.safetensors")
    return a


def settings(a):
    """Everything that determines the result (the resume check and the file header)."""
    keys = ["ckpt", "rotation", "init", "bits", "group", "sym", "no_clip", "gptq", "act_order", "calib", "nsamples",
            "seqlen", "steps", "lr", "rows", "checkpoints", "optim", "lambda_unif", "unif_tokens", "seed"]
    return {k: getattr(a, k) for k in keys}


# -----------------------------------------------------------------------------
# calibration data

def calibration_samples(a, model, tok):
    """nsamples random windows of seqlen tokens from the calibration text (seeded), shape (N, T)."""
    path = a.calib
    if path is None and os.path.isfile(os.path.join(SHARED_DATA, "wikitext103_valid.txt")):
        path = os.path.join(SHARED_DATA, "wikitext103_valid.txt")
    g = torch.Generator().manual_seed(a.seed)
    if path is None:
        return data_free_samples(a, model, tok, g)
    ids = evaluation.tokenize_corpus(tok, path)
    if ids.numel() and ids.max() >= model.args.vocab_size:
        raise UserError(f"the tokenizer produces id {int(ids.max())}, beyond the model's vocabulary ({model.args.vocab_size})")
    if ids.numel() <= a.seqlen:
        raise UserError(f"{path}: {ids.numel()} tokens, fewer than one sample of --seqlen {a.seqlen}")
    starts = torch.randint(0, ids.numel() - a.seqlen, (a.nsamples,), generator=g)
    a.calib_source = f"{os.path.basename(path)} ({ids.numel()} tokens)"
    return torch.stack([ids[s:s + a.seqlen] for s in starts.tolist()])


def data_free_samples(a, model, tok, g):
    """No calibration text: sample it from the model itself (LLM-QAT's data-free calibration)."""
    print(f"no calibration text given or found: sampling {a.nsamples} x {a.seqlen} tokens from the model "
          f"(data-free calibration, slow on CPU)", file=sys.stderr)
    a.calib_source = "data-free (sampled from the model)"
    out = []
    for i in range(a.nsamples):
        first = int(torch.randint(0, tok.n_vocab, (1,), generator=g)) if tok.bos_id is None else tok.bos_id
        seq = [first] + model.generate([first], a.seqlen - 1, temperature=1.0, top_p=1.0, seed=a.seed + i)
        out.append(torch.tensor((seq + seq * a.seqlen)[: a.seqlen]))   # stopped early (EOS): repeat
    return torch.stack(out)


# -----------------------------------------------------------------------------
# per-block steps

@torch.no_grad()
def run_block(block, X, cos, sin, a, capture=False):
    """X (N, T, dim) on CPU -> block(X). capture: also H = sum x x^T / count and token subsamples per site."""
    dev = a.device
    stats, hooks = {}, []
    if capture:
        g = torch.Generator().manual_seed(a.seed + 7)
        for slot, linears in SITES:
            lin = block.get_submodule(linears[0])
            n = lin.in_features
            st = stats[slot] = dict(H=torch.zeros(n, n, dtype=torch.float64, device=dev), count=0, sub=[])

            def hook(mod, inp, st=st):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                st["H"] += (x.T @ x).double()
                st["count"] += x.shape[0]
                k = max(1, a.unif_tokens * x.shape[0] // (a.nsamples * a.seqlen))
                st["sub"].append(x[torch.randint(0, x.shape[0], (k,), generator=g).to(dev)].float().cpu())
            hooks.append(lin.register_forward_pre_hook(hook))
    out = torch.empty_like(X)
    try:
        for i in range(0, X.shape[0], a.batch_size):
            out[i:i + a.batch_size] = block(X[i:i + a.batch_size].to(dev), cos, sin).cpu()
    finally:
        for h in hooks:
            h.remove()
    if not torch.isfinite(out).all():
        raise UserError("non-finite activations (NaN/inf) in the calibration forward pass: check the checkpoint")
    for st in stats.values():
        st["H"] = (st["H"] / st["count"]).float()
        st["sub"] = torch.cat(st["sub"])[: a.unif_tokens].to(dev)
    return out, stats


def rel_loss(W, What, M, H, base):
    """trace(E H E^T) / trace(W H W^T),  E = W - What M."""
    return bq.recon_loss_trace(W, What, M, H) / base


def final_quantize(W, H, M, a):
    """The quantizer the file will hold, on the rotated weights: GPTQ on T H T^T, or RTN with clip search."""
    Wr = W @ M.T
    if a.gptq:
        return bq.gptq(Wr, M @ H @ M.T, a.qcfg, act_order=a.act_order)
    return bq.quantize(Wr, a.qcfg)


def scored(W, H, M, a, base):
    """(relative loss under the final quantizer, its (q, scale, zero))."""
    with torch.no_grad():
        qsz = final_quantize(W, H, M, a)
        return rel_loss(W, bq.dequantize(*qsz, a.group), M, H, base).item(), qsz


def learn_butterfly(W, H, base, Xu, a, site_seed):
    """Minimise the layer loss over the transform's angles (and K x K factor) with the straight-through RTN
    quantizer. The STE gradient is noisy and RTN is not the final quantizer, so iterates are scored with the
    final one (GPTQ or clipped RTN) `--checkpoints` times and the best is kept, the start included: learning
    never ends worse than its start. Returns (Transform, start loss, best loss, best (q, scale, zero))."""
    n = W.shape[1]
    g = torch.Generator(device=W.device).manual_seed(site_seed)

    def make(init):
        return bq.Transform(n, init, torch.Generator().manual_seed(site_seed)).to(W.device)

    if a.init == "best":    # the butterfly contains both identity and (a) Hadamard: start from the better
        cands = [make("identity"), make("hadamard")]
        scores = [scored(W, H, t.matrix().detach(), a, base) for t in cands]
        i = min(range(2), key=lambda j: scores[j][0])
        T, (start, best_q) = cands[i], scores[i]
    else:
        T = make(a.init)
        start, best_q = scored(W, H, T.matrix().detach(), a, base)
    best, best_state = start, copy.deepcopy(T.state_dict())
    def loss_of(T, rows=None):
        """trace(E H E^T) / trace(W H W^T) on a subset of rows; the transform acts on rows in its fast form:
        Q(W T^T) has rows Q(T w), and E = W - Q(W T^T) T has rows w - T^T q."""
        Ws = W if rows is None else W[rows]
        Wq = bq.fake_quant_ste(T(Ws), a.qcfg)
        E = Ws - T.transpose(Wq)
        rec = ((E @ H) * E).sum() / (base * Ws.shape[0] / W.shape[0])
        if a.lambda_unif:
            return rec + a.lambda_unif * bq.uniformity_loss(T(Xu), a.bits)
        return rec

    params = list(T.parameters())
    opt = (torch.optim.SGD(params, lr=a.lr, momentum=0.9) if a.optim == "sgd" else torch.optim.Adam(params, lr=a.lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, a.steps))
    every = max(1, a.steps // max(1, a.checkpoints))
    for step in range(1, a.steps + 1):
        rows = None
        if a.rows and W.shape[0] > a.rows:   # a random subset of output rows per step: the loss is a sum over rows
            rows = torch.randperm(W.shape[0], generator=g, device=W.device)[: a.rows]
        loss = loss_of(T, rows)
        if not torch.isfinite(loss):
            raise UserError(f"NaN/inf loss at step {step} while learning a butterfly: lower --lr (now {a.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == a.steps:
            score, qsz = scored(W, H, T.matrix().detach(), a, base)
            if score < best:
                best, best_state, best_q = score, copy.deepcopy(T.state_dict()), qsz
    T.load_state_dict(best_state)
    return T, start, best, best_q


def quantize_site(block, slot, linears, st, a, site_seed):
    """Choose T for one site, quantize Q(W T^T) for each of its linears, install QuantLinear + OnlineTransform.
    Returns (header entry for the transform or None, relative loss before learning, after quantization)."""
    dev = a.device
    Ws = [block.get_submodule(l).weight.detach().to(dev, torch.float32) for l in linears]
    W = torch.cat(Ws)                          # (sum of outs, n): linears sharing an input share T
    n = W.shape[1]
    H = st["H"]
    base = ((W @ H) * W).sum()          # trace(W H W^T): the loss of quantizing everything to zero
    entry, first = None, float("nan")
    if a.rotation == "butterfly":
        T, first, after, (q, s, z) = learn_butterfly(W, H, base, st["sub"], a, site_seed)
        entry = dict(n=n, dense=False, K=T.K, m=T.m,
                     theta=T.butterfly.theta.detach().cpu(), Q=T.q().detach().cpu() if T.K > 1 else None)
    else:
        if a.rotation == "none":
            M = torch.eye(n, device=dev)
        else:
            M = fixed_matrix(n, a.rotation, site_seed).to(dev)
            entry = dict(n=n, dense=True, kind=a.rotation, seed=site_seed)
        after, (q, s, z) = scored(W, H, M, a, base)
    row = 0
    for name, Wl in zip(linears, Ws):
        out_f = Wl.shape[0]
        ql = QuantLinear(n, out_f, a.bits, a.group).to(dev)
        ql.qweight.copy_(bq.pack(q[row:row + out_f], a.bits))
        ql.scales.copy_(s[row:row + out_f].half())
        ql.zeros.copy_(z[row:row + out_f].half())
        parent, child = name.rsplit(".", 1)
        setattr(block.get_submodule(parent), child, ql)
        row += out_f
    if entry is not None:
        install_transform(block, slot, entry, dev)
    return entry, first, after


def install_transform(block, slot, entry, dev):
    t = OnlineTransform(entry["n"], entry.get("K", 1), entry.get("m"), entry["dense"]).to(dev)
    if entry["dense"]:
        t.M.copy_(fixed_matrix(entry["n"], entry["kind"], entry["seed"]))
    else:
        t.theta.copy_(entry["theta"])
        if entry["K"] > 1:
            t.Q.copy_(entry["Q"])
    parent, child = slot.rsplit(".", 1)
    setattr(block.get_submodule(parent), child, t)


def header_entry(entry):
    return {k: v for k, v in entry.items() if k not in ("theta", "Q")}


# -----------------------------------------------------------------------------
# files: atomic writes, per-block partial results for resuming

def save_atomic(tensors, header, path):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"butterflyquant": json.dumps(header)})
    os.replace(tmp, path)


def block_tensors(block, prefix):
    """What a finished block stores: packed linears, angles / Q, norms (fixed matrices are rebuilt from seeds)."""
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in block.state_dict().items() if not k.endswith(".M")}


def load_partial_block(block, prefix, path, dev, a):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["butterflyquant"])
        sd = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys()}
    for slot, linears in SITES:
        for name in linears:
            lin = block.get_submodule(name)
            parent, child = name.rsplit(".", 1)
            setattr(block.get_submodule(parent), child, QuantLinear(lin.in_features, lin.out_features, a.bits, a.group))
        e = meta["transforms"].get(slot)
        if e is not None:
            if not e["dense"]:
                e = dict(e, theta=sd[f"{slot}.theta"], Q=sd.get(f"{slot}.Q"))
            install_transform(block, slot, e, dev)
    block.to(dev)
    block.load_state_dict(sd, strict=False)
    return meta


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# -----------------------------------------------------------------------------

def calibrate(a):
    torch.manual_seed(a.seed)
    t_start = time.time()
    if a.calib is not None and not os.path.isfile(a.calib):
        raise UserError(f"calibration file not found: {a.calib}")
    model, tok = llama.load(a.ckpt)
    if tok is None:
        raise UserError(f"{a.ckpt}: no tokenizer found beside the checkpoint")
    args = model.args
    eval_files = a.eval_data if a.eval_data is not None else (
        [os.path.join(SHARED_DATA, "wikitext2_test.txt")] if os.path.isdir(SHARED_DATA) else [])
    if not a.no_eval:
        for path in eval_files:
            evaluation.read_corpus(path)        # fail now, not after calibrating
    samples = calibration_samples(a, model, tok)                       # (N, T)
    partial = a.out + ".partial"
    sett = settings(a)
    if os.path.isdir(partial):
        old = json.load(open(os.path.join(partial, "settings.json")))
        if old != sett:
            raise UserError(f"{partial} holds a run with other settings; delete it or rerun with the same arguments")
        print(f"resuming from {partial}", file=sys.stderr)
    else:
        os.makedirs(partial)
        with open(os.path.join(partial, "settings.json.tmp"), "w") as f:
            json.dump(sett, f)
        os.replace(os.path.join(partial, "settings.json.tmp"), os.path.join(partial, "settings.json"))

    dev = a.device
    print(f"calibrating {a.ckpt}: {args.n_layers} blocks, dim {args.dim}, ffn {args.hidden_dim} | W{a.bits} "
          f"g{a.group}{' sym' if a.sym else ''} {'GPTQ' if a.gptq else 'RTN'}{'' if a.no_clip else '+clip'} | "
          f"rotation {a.rotation}{'(' + a.init + ')' if a.rotation == 'butterfly' else ''} | "
          f"{a.nsamples}x{a.seqlen} tokens of {a.calib_source} | {dev}", file=sys.stderr)
    with torch.no_grad():
        X = model.tok_embeddings(samples).float()                       # (N, T, dim) on CPU
    cos, sin = model.rope(0, a.seqlen, dev)
    transforms, site_log = {}, {}
    t_blocks = time.time()
    done_now = 0
    for l, block in enumerate(model.layers):
        prefix = f"layers.{l}"
        bpath = os.path.join(partial, f"block_{l:03d}.safetensors")
        t0 = time.time()
        if os.path.isfile(bpath):       # finished in an earlier run: rebuild it and move on
            meta = load_partial_block(block, prefix, bpath, dev, a)
            X, _ = run_block(block, X, cos, sin, a)
            block.cpu()
            transforms.update({f"{prefix}.{k}": v for k, v in meta["transforms"].items()})
            site_log.update(meta["log"])
            continue
        block.to(dev, torch.float32)
        _, stats = run_block(block, X, cos, sin, a, capture=True)
        entries, log = {}, {}
        for s_i, (slot, linears) in enumerate(SITES):
            site_seed = a.seed * 1000003 + 4 * l + s_i
            entry, first, after = quantize_site(block, slot, linears, stats[slot], a, site_seed)
            if entry is not None:
                entries[slot] = entry
            log[f"{prefix}.{SHORT[slot]}"] = dict(start=round(first, 5), final=round(after, 5))
        del stats
        X, _ = run_block(block, X, cos, sin, a)                         # inputs of the next block, quantized path
        save_atomic(block_tensors(block, prefix),
                    dict(transforms={k: header_entry(v) for k, v in entries.items()}, log=log), bpath)
        block.cpu()
        transforms.update({f"{prefix}.{k}": header_entry(v) for k, v in entries.items()})
        site_log.update(log)
        done_now += 1
        el = time.time() - t_blocks
        eta = el / done_now * (args.n_layers - l - 1)
        bar = "#" * round(20 * (l + 1) / args.n_layers)
        sites = "  ".join(f"{SHORT[s]} {log[f'{prefix}.{SHORT[s]}']['start']:.3f}->{log[f'{prefix}.{SHORT[s]}']['final']:.3f}"
                          if a.rotation == "butterfly" else f"{SHORT[s]} {log[f'{prefix}.{SHORT[s]}']['final']:.3f}"
                          for s, _ in SITES)
        print(f"block {l + 1:3d}/{args.n_layers} |{bar:<20}| {sites} | {time.time() - t0:5.1f}s eta {fmt_time(eta)}",
              file=sys.stderr, flush=True)
    t_cal = time.time() - t_start

    # the file: packed blocks + fp tensors + tokenizer + header
    tensors = {}
    for l, block in enumerate(model.layers):
        tensors.update(block_tensors(block, f"layers.{l}"))
    tensors["tok_embeddings.weight"] = model.tok_embeddings.weight.detach().float()
    tensors["norm.weight"] = model.norm.weight.detach().float()
    if not args.tie_embeddings:
        tensors["output.weight"] = model.output.weight.detach().float()
    tensors["tokenizer.blob"] = torch.frombuffer(bytearray(tok.blob), dtype=torch.uint8)
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    numel = sum(m.in_features * m.out_features for m in packed)
    bpw = sum(m.qweight.numel() * 32 + (m.scales.numel() + m.zeros.numel()) * 16 for m in packed) / numel
    header = dict(format="butterflyquant-1", config=asdict(args), tokenizer=tok.kind,
                  quant=dict(bits=a.bits, group=a.group, sym=a.sym), transforms=transforms, settings=sett,
                  calib_source=a.calib_source, log=site_log, bits_per_weight=round(bpw, 4),
                  calibration_seconds=round(t_cal, 1), device=dev)
    save_atomic(tensors, header, a.out)
    shutil.rmtree(partial, ignore_errors=True)

    finals = [v["final"] for v in site_log.values()]
    print(f"\nwrote {a.out}: {os.path.getsize(a.out) / 2 ** 20:.1f} MiB, {bpw:.3f} bits per packed weight "
          f"({numel / 1e6:.1f}M weights)", file=sys.stderr)
    print(f"calibration {fmt_time(t_cal)} on {dev}; mean relative layer loss {sum(finals) / len(finals):.4f}",
          file=sys.stderr)
    results = dict(out=a.out, bits_per_weight=round(bpw, 4), calibration_seconds=round(t_cal, 1),
                   mean_layer_loss=round(sum(finals) / len(finals), 5), settings=sett)
    if not a.no_eval and eval_files:
        fp_model, _ = llama.load(a.ckpt)
        qmodel, qtok = llama.load(a.out)                # the saved file, through the real loading path
        fp_model.to(dev)
        qmodel.to(dev)
        for path in eval_files:
            ids = evaluation.tokenize_corpus(qtok, path)
            fp = evaluation.perplexity(fp_model, ids, a.seqlen, a.eval_limit)
            qp = evaluation.perplexity(qmodel, ids, a.seqlen, a.eval_limit)
            nwin = min(ids.numel() // a.seqlen, a.eval_limit or 10 ** 9)
            name = os.path.basename(path)
            print(f"{name}: perplexity {qp:.3f} quantized vs {fp:.3f} unquantized ({nwin} windows of {a.seqlen})",
                  file=sys.stderr)
            results[f"ppl_{name}"] = round(qp, 4)
            results[f"fp_ppl_{name}"] = round(fp, 4)
            results["eval_windows"] = nwin
    print(json.dumps(results))
    return results


# -----------------------------------------------------------------------------
# the results table:  python calibrate.py --sweep   (resumable: finished rows are kept in out/sweep.jsonl)

SWEEP_QUANT = [(2, 128), (2, 64), (3, 128), (4, 128)]
SWEEP_ROT = [("none", []), ("hadamard", []), ("random", []), ("butterfly", ["--init", "identity"]),
             ("butterfly", ["--init", "hadamard"]), ("butterfly", ["--init", "best"]),
             ("butterfly", ["--init", "best", "--lambda_unif", "0.1"])]


def sweep_rows(only=()):
    """[(tag, extra calibrate.py flags)], the fp row first. `only`: full row names match themselves alone
    (w2g64-rtn-butterfly-best is not w2g64-rtn-butterfly-best-0.1), any other string matches as a substring."""
    rows = [("fp", None)] + [(f"w{b}g{g}-{q}-{rot}{'-' + '-'.join(x[1::2]) if x else ''}",
                              ["--bits", str(b), "--group", str(g), "--" + q, "--rotation", rot, *x])
                             for b, g in SWEEP_QUANT for q in ("rtn", "gptq") for rot, x in SWEEP_ROT]
    tags = {t for t, _ in rows}
    return [(t, x) for t, x in rows if not only or t == "fp" or any(o == t if o in tags else o in t for o in only)]


def sweep(argv):
    """Every (bits, group) x {RTN, GPTQ} x rotation through the same code path; ppl on every eval file."""
    a = parse_args(argv)
    only = [t for t in (a.sweep_only or "").split(",") if t]
    path = os.path.join("out", "sweep.jsonl")
    os.makedirs("out", exist_ok=True)
    done = {}
    if os.path.isfile(path):
        for line in open(path):
            r = json.loads(line)
            done[r["tag"]] = r
    eval_files = a.eval_data if a.eval_data is not None else [os.path.join(SHARED_DATA, f) for f in
                                                              ("wikitext2_test.txt", "c4_eval.jsonl")]
    for tag, extra in sweep_rows(only):
        if tag in done:
            continue
        if tag == "fp":
            model, tok = llama.load(a.ckpt)
            secs, bpw = 0.0, 16.0
        else:
            out = os.path.join("out", f"sweep-{tag}.safetensors")
            keep = [x for x in argv if x != "--sweep"]
            res = main(keep + extra + ["--out", out, "--no_eval"])
            model, tok = llama.load(out)
            secs, bpw = res["calibration_seconds"], res["bits_per_weight"]
        model.to(a.device)
        r = dict(tag=tag, bits_per_weight=bpw, calibration_seconds=secs, device=a.device, nsamples=a.nsamples,
                 eval_limit=a.eval_limit)
        for f in eval_files:
            ids = evaluation.tokenize_corpus(tok, f)
            r[os.path.basename(f)] = round(evaluation.perplexity(model, ids, a.seqlen, a.eval_limit), 3)
        print(json.dumps(r), flush=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        done[tag] = r
        del model
    names = [os.path.basename(f) for f in eval_files]
    print("\n| config | " + " | ".join(names) + " | bits/weight | calib s |\n|---|" + "---|" * (len(names) + 2))
    for tag, r in done.items():
        print(f"| {tag} | " + " | ".join(str(r.get(n, "-")) for n in names) +
              f" | {r['bits_per_weight']} | {r['calibration_seconds']} |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--sweep" in argv:
        return sweep(argv)
    a = parse_args(argv)
    if not os.path.exists(a.ckpt) and a.ckpt not in llama.NAMED:
        llama.resolve_ckpt(a.ckpt)     # one clear line for an unknown name
    return calibrate(a)


if __name__ == "__main__":
    llama.cli(main)
