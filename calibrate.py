"""
Learn one transform per linear-input site (by default all at once, on the model's next-token KL), then quantize
the rotated weights block by block.

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
With --objective kl (the default), every T is learned first, on the whole model's next-token KL under a
straight-through stand-in for the final quantizer, and step 2 only quantizes; the per-site objectives (layer: the
paper's, gptq, block) learn T in step 2.
With --gptaq ALPHA, steps 1 and 2 go site by site instead (true-sequential): each site's H, and D against the
unquantized model's own inputs to that site, are collected with the block's earlier sites already quantized, and
GPTQ fits a target moved toward the unquantized outputs (butterflyquant.gptaq_target).
The same code path runs the baselines (--rotation none / hadamard / random), so the comparison is fair.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

# idle OpenMP threads sleep instead of spinning: where other jobs share the 2 cores, spinning made a decode step
# 6x slower (38 s vs 6 s for 8 steps at batch 16 on SmolLM2). It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn as nn
import torch.nn.functional as F

import butterflyquant as bq
import eval as evaluation
import llama
from llama import SITES, UserError

SHARED_DATA = evaluation.SHARED_DATA
DATA_FREE_CPU = (16, 512)     # nsamples, seqlen sampled on a CPU without calibration text: the first run in minutes
REPORT_CPU, REPORT_GPU = (8, 512), (32, 2048)     # the quality report's sampled text when no evaluation text is found
NON_FINITE = "non-finite activations (NaN/inf) in the calibration forward pass: check the checkpoint"
LOWER_LR = "lower --lr and delete the .partial folder beside --out (its blocks were made with this --lr)"
SHORT = {"attention.rot_qkv": "qkv", "attention.rot_o": "o", "feed_forward.rot_up": "up", "feed_forward.rot_down": "down"}


@dataclass
class CalibConfig:
    ckpt: str = "smollm2-135m"
    rotation: str = "butterfly"         # none | hadamard | random | butterfly (learned)
    calib: Optional[str] = None         # .txt / .jsonl, wikitext2 or c4, or a+b; None: WikiText-103 or data-free
    nsamples: int = 32
    seqlen: int = 2048
    seed: int = 0
    unif_tokens: int = 256              # tokens per site kept for the uniformity regulariser
    batch_size: int = 4                 # samples per forward pass (does not change the result)
    device: str = "cpu"                 # (does not change the result beyond float rounding)
    finetune: int = 0                   # steps of the end-to-end pass after the last block (0: none)
    finetune_lr: Optional[float] = None  # its Adam learning rate (cosine-decayed); None: finetune_lr(bits)
    gptaq: float = 0.0                  # GPTQ's target moved toward the unquantized outputs (bq.gptaq_target); 0: off
    finetune_transforms: bool = False   # the pass learns the learned transforms too, not only the scales
    finetune_codes: float = 0.0         # the pass moves the integer codes too, each at most ~this many steps; 0: off


def settings(cc, qc, lc):
    """Everything that determines the result: the resume check and the file header (gptaq and finetune_codes only
    when used, and finetune_transforms only with a pass, so that files made before they existed keep their settings;
    a pass made before finetune_transforms existed learned the transforms, and no longer matches)."""
    d = {k: v for k, v in asdict(cc).items() if k not in ("batch_size", "device")
         and (k != "gptaq" or v) and (k != "finetune_codes" or v and cc.finetune)
         and (k != "finetune_transforms" or cc.finetune)}
    learn = {k: v for k, v in asdict(lc).items() if k != "block_input" or v != "quantized"}     # as before it existed
    return dict(d, quant=asdict(qc), learn=learn if cc.rotation == "butterfly" or lc.lwc else None)


# -----------------------------------------------------------------------------
# calibration data

def calib_sources(calib):
    """--calib -> its sources: one file or name, or several joined by + (wikitext2+c4); a file whose own name
    holds a + is one source."""
    if calib is None or os.path.isfile(calib):
        return [calib]
    parts = calib.split("+")
    if "" in parts:
        raise UserError(f"--calib {calib}: an empty source")
    return parts


def calibration_samples(cc, model, tok):
    """(nsamples random windows of seqlen tokens (N, T), a description of their source). Several sources share
    the samples evenly (the first ones take the remainder), each drawn from its own text with one generator."""
    if cc.calib is None and evaluation.find_dataset("wikitext2", "calib") is None:
        ids = evaluation.sample_text(model.to(cc.device), tok, cc.nsamples, cc.seqlen, cc.seed, "data-free calibration")
        model.cpu()     # on the device: sampling is most of a data-free run's forward passes
        return ids, "data-free: sampled from the model"
    sources = calib_sources(cc.calib) if cc.calib is not None else ["wikitext2"]     # the local one, found above
    if len(sources) > cc.nsamples:
        raise UserError(f"--calib {cc.calib}: {len(sources)} sources for --nsamples {cc.nsamples}")
    g, picked, labels = torch.Generator().manual_seed(cc.seed), [], []
    for i, src in enumerate(sources):
        path, label = evaluation.resolve_data(src, "calib")
        ids = evaluation.tokenize_corpus(tok, path)
        if ids.numel() and ids.max() >= model.args.vocab_size:
            raise UserError(f"the tokenizer produces id {int(ids.max())}, beyond the model's vocabulary "
                            f"({model.args.vocab_size})")
        if ids.numel() <= cc.seqlen:
            raise UserError(f"{path}: {ids.numel()} tokens, fewer than one sample of --seqlen {cc.seqlen}")
        n = cc.nsamples // len(sources) + (i < cc.nsamples % len(sources))
        starts = torch.randint(0, ids.numel() - cc.seqlen, (n,), generator=g)
        picked += [ids[s:s + cc.seqlen] for s in starts.tolist()]
        labels.append(("" if len(sources) == 1 else f"{n} of ") + f"{label} ({ids.numel()} tokens)")
    return torch.stack(picked), " + ".join(labels)


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
        raise UserError(NON_FINITE)
    for st in stats.values():
        st["H"] = (st["H"] / st["count"]).float()
        st["sub"] = torch.cat(st["sub"])[: cc.unif_tokens].to(dev)
    return out, stats


def learn_block_transforms(block, stats, X, Y, cos, sin, cc, qc, lc, layer):
    """The block objective: start every site as the layer objective would (lc.init), then learn the four
    transforms (and, with lc.lwc, per-group clip factors) jointly on the block's output (butterflyquant.learn_block),
    under straight-through RTN or (lc.kl_quantizer gptq) GPTQ's stand-in on each site's H.
    X, Y: the block's inputs on the quantized path and the unquantized block's outputs on them, (N, T, dim)."""
    dev, n_tok = cc.device, min(lc.tokens, X.shape[1])
    weights = {name: block.get_submodule(name).weight.detach().to(dev, torch.float32) for _, ls in SITES for name in ls}
    transforms, starts = {}, {}
    for s_i, (slot, linears) in enumerate(SITES):
        W = torch.cat([weights[name] for name in linears])
        T, loss, qsz = bq.start_transform(W, stats[slot]["H"], qc, lc.init, cc.seed * 1000003 + 4 * layer + s_i,
                                          ((W @ stats[slot]["H"]) * W).sum())
        transforms[slot], starts[slot] = T, (loss, qsz, copy.deepcopy(T.state_dict()))
    gammas = None
    if lc.lwc:
        gammas = {name: torch.full((2, W.shape[0], bq.ngroups(W.shape[1], qc.group)), 4.0, device=dev,
                                   requires_grad=True) for name, W in weights.items()}    # sigmoid(4) = 0.98
    for p in block.parameters():
        p.requires_grad_(False)
    for slot, T in transforms.items():
        llama.swap_module(block, slot, T)
    cos, sin = cos[:n_tok], sin[:n_tok]                   # positions 0 .. n_tok - 1

    def forward(Wq, x):
        return torch.func.functional_call(block, {f"{k}.weight": v for k, v in Wq.items()}, (x.to(dev), cos, sin))

    g = torch.Generator().manual_seed(cc.seed * 1000003 + 4 * layer)
    try:
        hessians = {slot: stats[slot]["H"].to(dev) for slot, _ in SITES} if lc.kl_quantizer == "gptq" else None
        start, end = bq.learn_block(forward, weights, SITES, transforms, X[:, :n_tok], Y[:, :n_tok].to(dev), qc,
                                    lc, gammas, g, hessians)
    except bq.LearningError as e:
        raise UserError(f"{e}: {LOWER_LR if layer else 'lower --lr'}") from None
    return transforms, starts, gammas, (start, end)


class SiteReached(Exception):
    """Raised at the input of the linear whose input is wanted: the rest of the block need not run."""


@torch.no_grad()
def site_input(block, name, x, cos, sin, weights=None):
    """The input (tokens, n) of linear `name` when `block` (with `weights` in place of its own, if given) runs on
    x (B, T, dim), the block stopped there."""
    got = []

    def hook(mod, inp):
        got.append(inp[0])
        raise SiteReached
    h = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        torch.func.functional_call(block, weights or {}, (x, cos, sin))
    except SiteReached:
        pass
    finally:
        h.remove()
    return got[0].reshape(-1, got[0].shape[-1])


@torch.no_grad()
def block_with_inputs(block, names, x, cos, sin):
    """block(x) (B, T, dim) and {name: the input (tokens, n) of module `name`} on the way: every site's input in
    the one pass that gives the block's output, where site_input would run the block up to each site again."""
    got, hooks = {}, []
    for name in names:
        hooks.append(block.get_submodule(name).register_forward_pre_hook(
            lambda mod, inp, name=name: got.setdefault(name, inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        y = block(x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    return y, got


def sequential_stats(block, fp_weights, name, X, Xr, cos, sin, cc):
    """--gptaq: H = X~ X~^T / N and D = (X - X~) X~^T / N (float64) at the input of linear `name`; X~ from the
    block as it now is (its earlier sites quantized) on the quantized path's inputs X, X from the unquantized
    block (fp_weights) on the unquantized path's Xr. Batch by batch, so no site's inputs are stored."""
    dev, count = cc.device, 0
    n = block.get_submodule(name).in_features
    H, D = (torch.zeros(n, n, dtype=torch.float64, device=dev) for _ in range(2))
    for i in range(0, X.shape[0], cc.batch_size):
        xr = site_input(block, name, Xr[i:i + cc.batch_size].to(dev), cos, sin, fp_weights)
        x = site_input(block, name, X[i:i + cc.batch_size].to(dev), cos, sin)
        H += (x.T @ x).double()
        D += ((xr - x).T @ x).double()
        count += x.shape[0]
    if not (torch.isfinite(H).all() and torch.isfinite(D).all()):
        raise UserError(NON_FINITE)
    return H.div_(count), D.div_(count)


def quantize_block(block, stats, cc, qc, lc, layer, X=None, Y=None, cos=None, sin=None, given=None, clips=None,
                   Xr=None):
    """Choose T and quantize Q(W T^T) at every site of one block, then install the quantized block.
    given: {slot: Transform} learned beforehand (the kl objective), used as they are; clips: {linear: gamma
    (2, out, groups)} learned clip factors (the kl objective with lwc), which set the final quantizer's ranges.
    Xr: the unquantized model's inputs to this block (--gptaq, in place of stats): site by site, H and D come from
    the block with its earlier sites already quantized (true-sequential) and GPTQ fits bq.gptaq_target.
    Returns (the block's tensors, {slot: transform entry}, {site: relative layer loss before and after})."""
    tensors, entries, log, t0 = {}, {}, {}, time.time()
    fp_weights = None if Xr is None else {f"{name}.weight": block.get_submodule(name).weight.detach().clone()
                                          for _, linears in SITES for name in linears}
    learned, starts, gammas, block_loss = {}, {}, clips or None, None
    if cc.rotation == "butterfly" and lc.objective == "block":
        learned, starts, gammas, block_loss = learn_block_transforms(block, stats, X, Y, cos, sin, cc, qc, lc, layer)
    for s_i, (slot, linears) in enumerate(SITES):
        evaluation.progress_line(f"block {layer + 1}: learning and quantizing site", s_i + 1, len(SITES), t0,
                                 SHORT[slot], keep=False)
        seed = cc.seed * 1000003 + 4 * layer + s_i
        Ws = [block.get_submodule(name).weight.detach().to(cc.device, torch.float32) for name in linears]
        W = torch.cat(Ws)                           # (sum of outs, n): linears sharing an input share T
        n = W.shape[1]
        if Xr is None:
            H = stats[slot]["H"]
        else:
            H, D = sequential_stats(block, fp_weights, linears[0], X, Xr, cos, sin, cc)
            W, H = bq.gptaq_target(W, H, D, cc.gptaq), H.float()
            del D
        gamma = None if gammas is None else torch.cat([gammas[name].detach() for name in linears], 1)
        first = float("nan")
        if cc.rotation == "butterfly":
            try:
                if given and slot in given:     # chosen by the model's KL, not by this layer's loss
                    T = given[slot]
                    after, (q, s, z) = bq.score(W, H, T.matrix().detach(), qc, ((W @ H) * W).sum(), gamma)
                elif slot in learned:     # kept only if the final quantizer's layer loss improved on the start's
                    T, (first, start_qsz, start_state) = learned[slot], starts[slot]
                    after, (q, s, z) = bq.score(W, H, T.matrix().detach(), qc, ((W @ H) * W).sum(), gamma)
                    if after > first:
                        T.load_state_dict(start_state)
                        after, (q, s, z) = first, start_qsz
                else:
                    T, first, after, (q, s, z) = bq.learn_transform(W, H, qc, lc, seed, stats[slot]["sub"])
            except bq.LearningError as e:
                raise UserError(f"{e}: {LOWER_LR if layer else 'lower --lr'}") from None
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
            after, (q, s, z) = bq.score(W, H, M, qc, ((W @ H) * W).sum(), gamma)
        row = 0
        What = None if Xr is None else bq.dequantize(q, s.half().float(), z.half().float(), qc.group) @ M  # W~ = Q T
        for name, Wl in zip(linears, Ws):
            rows = slice(row, row + Wl.shape[0])
            tensors[f"{name}.qweight"] = bq.pack(q[rows], qc.bits).cpu()
            tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = s[rows].half().cpu(), z[rows].half().cpu()
            if What is not None:        # the later sites' statistics see this site quantized, as stored
                block.get_submodule(name).weight.data = What[rows].contiguous()
            row += Wl.shape[0]
        log[SHORT[slot]] = dict(start=round(first, 5), final=round(after, 5))
    if block_loss is not None:
        log["block"] = dict(start=round(block_loss[0], 7), final=round(block_loss[1], 7))
    tensors["attention_norm.weight"] = block.attention_norm.weight.detach().float().cpu()
    tensors["ffn_norm.weight"] = block.ffn_norm.weight.detach().float().cpu()
    llama.install_quantized_block(block, tensors, entries, qc.bits, qc.group)
    return tensors, entries, log


# -----------------------------------------------------------------------------
# the driver: collect -> learn and quantize a block -> write, resumable

def fingerprint(model):
    """blake2b of every tensor (name, dtype, shape, bytes): a resumed run must see the same weights, not just the
    same path."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in model.state_dict().items():
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tokens_fingerprint(samples):
    """blake2b of the calibration tokens: a resumed run must learn on the same text, not just the same --calib."""
    return hashlib.blake2b(samples.cpu().long().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


FINGERPRINTS = ("ckpt_fingerprint", "calib_fingerprint")        # in the settings, beside what settings() records
PASS_KEYS = ("finetune", "finetune_lr", "finetune_transforms", "finetune_codes")   # the pass's: no block depends on them


def kept(out, sett):
    """The summary of `out` when an earlier run already wrote it with exactly `sett` (the settings, the checkpoint's
    and the calibration tokens' fingerprints), else None: rerunning a finished command reports on its file instead of
    calibrating again."""
    if not os.path.isfile(out):
        return None
    header = llama.read_safetensors(out, tensors=False)[0]
    if header.get("settings") != json.loads(json.dumps(sett)):
        return None
    print(f"{out} was made with these settings, checkpoint and calibration tokens: kept (delete it to make it "
          f"again)", file=sys.stderr)
    return dict(file_summary(out, header), kept=True)


def file_summary(path, header):
    """What calibrate() returns about the file it wrote, read back from that file's header."""
    return dict(out=path, bits_per_weight=header.get("bits_per_weight"),
                calibration_seconds=header.get("calibration_seconds"), calib_source=header.get("calib_source"),
                settings=header.get("settings"))


def start_partial(partial, sett):
    """OUT.partial/ with its settings.json, made when the first result worth keeping is ready."""
    if not os.path.isfile(os.path.join(partial, "settings.json")):
        os.makedirs(partial, exist_ok=True)
        with open(os.path.join(partial, "settings.json.tmp"), "w") as f:
            json.dump(sett, f)
        os.replace(os.path.join(partial, "settings.json.tmp"), os.path.join(partial, "settings.json"))


def calibrate(cc: CalibConfig, qc: bq.QuantConfig, lc: bq.LearnConfig, out, eval_files=(), eval_seqlen=2048):
    """Calibrate cc.ckpt and write `out`; returns a summary dict. Everything is checked before any work;
    OUT.partial/ appears with the first result worth keeping (the kl objective's transforms, or the first
    finished block) and keeps them."""
    if lc.lwc and cc.rotation != "butterfly" and lc.objective != "kl":
        raise UserError(f"--lwc with --rotation {cc.rotation}: a fixed rotation's clip factors are learned by the kl "
                        f"objective only (the default: drop --objective)")
    if lc.kl_quantizer in ("gptq", "gptaq") and not qc.gptq:
        raise UserError(f"--kl_quantizer {lc.kl_quantizer} stands in for GPTQ: drop --rtn, or drop --kl_quantizer (under "
                        f"--rtn: rtnh)")
    if lc.kl_quantizer == "gptaq" and not cc.gptaq:
        raise UserError("--kl_quantizer gptaq stands in for GPTQ under --gptaq: give --gptaq ALPHA")
    if cc.gptaq and (not qc.gptq or lc.lwc or (cc.rotation == "butterfly" and lc.objective != "kl")):
        raise UserError("--gptaq moves GPTQ's target: it needs GPTQ (drop --rtn), no learned clip factors (they were "
                        "learned for the weights it moves: drop --lwc) and, with learned butterflies, transforms learned "
                        "before quantizing (the kl objective, the default: drop --objective)")
    torch.manual_seed(cc.seed)
    t_start = time.time()
    model, tok = llama.load(cc.ckpt)
    if tok is None:
        raise UserError(f"{cc.ckpt}: no tokenizer found beside the checkpoint")
    args = model.args
    if cc.seqlen > args.max_seq_len:
        raise UserError(f"--seqlen {cc.seqlen}: beyond the model's context of {args.max_seq_len} tokens")
    if qc.group > max(args.dim, args.hidden_dim):
        raise UserError(f"--group {qc.group}: wider than every linear's input (at most {max(args.dim, args.hidden_dim)}); "
                        f"0 is one group per row")
    llama.check_memory((4 if cc.gptaq else 3) * cc.nsamples * cc.seqlen * args.dim * 4,
                       f"--nsamples {cc.nsamples} x --seqlen {cc.seqlen}")
    if lc.objective == "kl" and (cc.rotation == "butterfly" or lc.lwc):
        check_kl_memory(model, cc.device, lc.kl_quantizer in ("gptq", "gptaq", "rtnh"), lc.kl_quantizer in ("gptq", "gptaq"),
                        lc.kl_quantizer == "gptaq")
    for path in eval_files:     # fail now, not after calibrating
        evaluation.windows(evaluation.tokenize_corpus(tok, path), min(eval_seqlen, args.max_seq_len))
    samples, source = calibration_samples(cc, model, tok)               # (N, T)
    partial = out + ".partial"
    if cc.finetune and cc.finetune_lr is None:
        cc = replace(cc, finetune_lr=finetune_lr(qc.bits))
    sett = dict(settings(cc, qc, lc), ckpt_fingerprint=fingerprint(model), calib_fingerprint=tokens_fingerprint(samples))
    if os.path.isdir(partial):
        sj = os.path.join(partial, "settings.json")
        old = llama.read_json(sj) if os.path.isfile(sj) else None
        blocks_only = lambda d: {k: v for k, v in d.items() if k not in PASS_KEYS}  # noqa: E731
        if not isinstance(old, dict) or blocks_only(old) != blocks_only(sett):    # the pass runs after the blocks
            same = lambda d: {k: v for k, v in blocks_only(d).items() if k not in FINGERPRINTS}   # noqa: E731
            what = "with other settings" if not isinstance(old, dict) or same(old) != same(sett) else \
                "of other checkpoint contents (the weights at --ckpt changed)" \
                if old.get("ckpt_fingerprint") != sett["ckpt_fingerprint"] else \
                f"on other calibration tokens (the text of {source} changed)"
            raise UserError(f"{partial} holds a run {what}; delete it to start over, or rerun with the same "
                            f"arguments, checkpoint and calibration text")
        print(f"resuming from {partial}", file=sys.stderr)
    elif (res := kept(out, sett)) is not None:
        return res
    if cc.finetune:
        check_pass_memory(model, cc.device, qc.bits, cc.finetune_codes)

    dev = cc.device
    print(f"calibrating {cc.ckpt}: {args.n_layers} blocks, dim {args.dim}, ffn {args.hidden_dim} | W{qc.bits} "
          f"g{qc.group}{' sym' if qc.sym else ''} {'GPTQ' if qc.gptq else 'RTN'}{'+clip' if qc.clip else ''} | "
          f"rotation {cc.rotation}{'(' + lc.init + ')' if cc.rotation == 'butterfly' else ''} | "
          f"{cc.nsamples}x{cc.seqlen} tokens of {source} | {dev}", file=sys.stderr)
    kl_transforms, kl_clips, kl_log = {}, {}, None
    if lc.objective == "kl" and (cc.rotation == "butterfly" or lc.lwc):
        kl_transforms, kl_clips, kl_log = kl_learned(model, samples, cc, qc, lc, partial, sett)
    with torch.no_grad():
        X = model.tok_embeddings(samples).float()                       # (N, T, dim) on CPU
    fp_blocks = lc.objective == "block" and lc.block_input == "fp" and cc.rotation == "butterfly"
    Xr = X.clone() if cc.gptaq or fp_blocks else None     # the unquantized path's inputs (--gptaq, --block_input fp)
    cos, sin = model.rope(0, cc.seqlen, dev)
    site_log, t_blocks, done_now = {}, time.time(), 0
    for l, block in enumerate(model.layers):
        bpath = os.path.join(partial, f"block_{l:03d}.safetensors")
        t0 = time.time()
        block.to(dev, torch.float32)
        if os.path.isfile(bpath):       # finished in an earlier run: rebuild it and move on
            header, tensors = llama.read_safetensors(bpath)
            if Xr is not None:
                Xr, _ = run_block(block, Xr, cos, sin, cc, label=f"block {l + 1}: forward, unquantized (resumed)")
            try:
                slots = set() if cc.rotation == "none" else {slot for slot, _ in SITES}
                if set(header["transforms"]) != slots or set(header["log"]) - {"block"} != set(SHORT.values()):
                    raise ValueError(f"transforms {sorted(header['transforms'])}, want {sorted(slots)}")
                llama.check_finite(tensors, bpath)
                llama.install_quantized_block(block, tensors, header["transforms"], qc.bits, qc.group)
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{bpath}: {e}; delete {partial} to start over") from None
            block.to(dev)
            X, _ = run_block(block, X, cos, sin, cc, label=f"block {l + 1}: forward (resumed)")
            block.cpu()
            site_log.update({f"layers.{l}.{k}": v for k, v in header["log"].items()})
            continue
        given = {slot: T for (i, slot), T in kl_transforms.items() if i == l}
        clips = {name: g for (i, name), g in kl_clips.items() if i == l}
        if not cc.gptaq:
            Y, stats = run_block(block, X, cos, sin, cc, capture=True, label=f"block {l + 1}: collecting H")
            Xl, Yl = X, Y       # what the block objective learns on: Y = the unquantized block's outputs on X
            if fp_blocks:
                Xl, (Yl, _) = Xr, run_block(block, Xr, cos, sin, cc, label=f"block {l + 1}: forward, unquantized")
                Xr = Yl
            tensors, entries, log = quantize_block(block, stats, cc, qc, lc, l, Xl, Yl, cos, sin, given, clips)
            del Y, Yl, Xl, stats
        else:
            Xr_next, _ = run_block(block, Xr, cos, sin, cc, label=f"block {l + 1}: forward, unquantized")
            tensors, entries, log = quantize_block(block, None, cc, qc, lc, l, X, None, cos, sin, given, clips, Xr)
            Xr = Xr_next
        block.to(dev)
        X, _ = run_block(block, X, cos, sin, cc, label=f"block {l + 1}: forward, quantized")   # the next inputs
        llama.check_finite(tensors, f"block {l} after quantization (fp16 scales overflow?)")
        start_partial(partial, sett)
        llama.write_safetensors(bpath, tensors, dict(transforms=entries, log=log))
        block.cpu()
        site_log.update({f"layers.{l}.{k}": v for k, v in log.items()})
        done_now += 1
        eta = (time.time() - t_blocks) / done_now * (args.n_layers - l - 1)
        bar = "#" * round(20 * (l + 1) / args.n_layers)
        sites = "  ".join(f"{k} {v['start']:.3f}->{v['final']:.3f}" if math.isfinite(v["start"]) else
                          f"{k} {v['final']:.3f}" for k, v in log.items())
        evaluation.say(f"block {l + 1:3d}/{args.n_layers} |{bar:<20}| {sites} | {time.time() - t0:5.1f}s "
                       f"eta {evaluation.fmt_time(eta)}")
    ft = None
    if cc.finetune:
        ref = llama.load(cc.ckpt)[0]
        try:
            ft = finetune(model, ref, samples, cc.finetune, cc.finetune_lr, cc.seed, dev, cc.finetune_transforms,
                          cc.finetune_codes)
        except bq.LearningError as e:
            raise UserError(f"{e}: lower --finetune_lr and rerun (the blocks in {partial} are kept)") from None
        del ref
    t_cal = time.time() - t_start

    packed = [m for m in model.modules() if m.__class__.__name__ == "QuantLinear"]
    numel = sum(m.in_features * m.out_features for m in packed)
    bpw = sum(bq.stored_bits_per_weight(m.qweight, m.scales, m.zeros, 1) for m in packed) / numel
    finals = [v["final"] for k, v in site_log.items() if not k.endswith(".block")]
    llama.save_quantized(out, model, tok, dict(bits=qc.bits, group=qc.group, sym=qc.sym), settings=sett,
                         calib_source=source, data_free=source.startswith("data-free"), log=site_log,
                         bits_per_weight=round(bpw, 4), calibration_seconds=round(t_cal, 1), device=dev,
                         finetune=ft, kl_objective=kl_log)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"\nwrote {out}: {os.path.getsize(out) / 2 ** 20:.1f} MiB, {bpw:.3f} bits per packed weight "
          f"({numel / 1e6:.1f}M weights)", file=sys.stderr)
    print(f"calibration {evaluation.fmt_time(t_cal)} on {dev} ({source}); mean relative layer loss "
          f"{sum(finals) / len(finals):.4f}", file=sys.stderr)
    return dict(out=out, bits_per_weight=round(bpw, 4), calibration_seconds=round(t_cal, 1),
                mean_layer_loss=round(sum(finals) / len(finals), 5), calib_source=source, settings=sett)


# -----------------------------------------------------------------------------
# the end-to-end pass: the scales (optionally the transforms) against the unquantized model's next-token distribution

FINETUNE_TOKENS = 1024      # tokens per step: the calibration samples are cut into chunks of this many
GPTAQ_SAMPLES = 4           # calibration samples behind the gptaq stand-in's H~ and D at each refresh (a pass of both models each)


def finetune_lr(bits):
    """Adam moves every scale by about lr per step whatever its gradient; the finer the grid, the less it takes
    to undo what GPTQ chose (README: W2 2e-3, W3 2e-4)."""
    return 2e-3 if bits <= 2 else 2e-4


class ScaledCodes(nn.Module):
    """A QuantLinear whose group scales learn, s = s0 exp(u), with its integer codes and zeros frozen: the file
    format stays what it was (new fp16 scales)."""

    def __init__(self, ql):
        super().__init__()
        if ql.pre is not None:
            raise ValueError("the end-to-end pass runs before fuse_transforms")
        self.ql = ql
        self.register_buffer("q", bq.unpack(ql.qweight, ql.bits, (ql.out_features, ql.in_features)))
        self.u = nn.Parameter(torch.zeros(ql.scales.shape, device=ql.scales.device))

    def scale(self):
        return self.ql.scales.float() * self.u.exp()

    def forward(self, x):   # (..., in) -> (..., out)
        return bq.codes_linear(x, self.q, self.scale(), self.ql.zeros.float(), self.ql.group)


FINETUNE_CODE_DRIFT = 1.0   # --finetune_codes' default: how far, in grid steps, Adam may move a latent code in the pass


class LatentCodes(ScaledCodes):
    """A ScaledCodes whose integer codes move too: a latent code c = q + r per weight, r learned from 0, rounded
    straight through, w = s (round(clamp(c, 0, 2^b - 1)) - z) (EfficientQAT's Block-AP learns W and rounds it
    straight through; it clamps after rounding, where here a latent past either end of the grid gets no gradient
    and stays there). Adam moves every r by about lr per step, so by about lr (S + 1) / 2 at most over a cosine
    schedule of S steps, most of it early, and a code flips once its latent crosses a half: at
    lr = 2 D / S (D = FINETUNE_CODE_DRIFT = 1 grid step by default) a code flips only if its gradient keeps its sign
    over much of the pass, and rarely twice (at D = 2 noise alone carries 8.7% of SmolLM2's W2 codes across, and the
    model is lost: README). It holds r, its gradient and Adam's two moments in fp32: 16 bytes per
    weight beside ScaledCodes' 1 (codes_linear rebuilds W in the backward pass, so autograd keeps none per weight)."""

    def __init__(self, ql):
        super().__init__(ql)
        self.r = nn.Parameter(torch.zeros(self.q.shape, device=self.q.device))
        self.qmax = 2 ** ql.bits - 1

    def codes(self):        # (out, in) integers in [0, 2^b) as floats
        return bq.latent_codes(self.q, self.r, self.qmax)

    def forward(self, x):   # (..., in) -> (..., out)
        return bq.codes_linear(x, self.q, self.scale(), self.ql.zeros.float(), self.ql.group, self.r, self.qmax)


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in the backward pass: on a GPU a 7B model's 32 blocks would
    otherwise keep ~1 GB each per 1024 tokens."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)


def kl_setup(model, ref, samples, seed, device):
    """The calibration tokens cut into chunks of FINETUNE_TOKENS in a seeded order, kl(i): the mean
    KL(ref || model) of the next-token distribution over chunk i's tokens, and probe(): kl on the first four
    chunks of that order (the same tokens before and after learning; each step's loss is on other tokens).
    Both models go to `device` frozen, model's embeddings and head in fp32 (its blocks already compute in fp32)."""
    for m in (model.tok_embeddings, model.norm, model.output):
        m.float()
    model.to(device)
    ref.to(device).eval()
    for p in list(model.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    c = min(samples.shape[1], FINETUNE_TOKENS)
    chunks = samples[:, : samples.shape[1] // c * c].reshape(-1, c)                 # (chunks, c)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))

    def kl(i):
        x = chunks[i][None].to(device)                                                  # (1, c)
        with torch.no_grad():
            lp_ref = F.log_softmax(ref(x)[0].float(), -1)                               # (c, vocab)
        return bq.kl_divergence(lp_ref, F.log_softmax(model(x)[0].float(), -1)).mean()

    @torch.no_grad()
    def probe():
        return sum(kl(i).item() for i in order[:4]) / len(order[:4])
    return kl, order, probe


def descend_kl(kl, order, params, steps, lr, label, t0, refresh=None, save=None, resume=None):
    """Adam, cosine-decayed, on kl(chunk), one chunk per step in `order` (cycled); refresh = (k, fn): fn() before
    every k-th step after the first; save = (k, fn): fn(step, opt, sched) after every k-th step before the last;
    resume: a saved step's dict(step, opt, sched), the descent going on from the step after it."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    if resume is not None:
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
    for step in range(1 if resume is None else resume["step"] + 1, steps + 1):
        if refresh and step > 1 and (step - 1) % refresh[0] == 0:
            refresh[1]()
        loss = kl(order[(step - 1) % len(order)])
        try:
            bq.descend(opt, sched, loss, step)
        except bq.LearningError as e:
            raise bq.LearningError(f"{label}: {e}") from None
        evaluation.progress_line(f"{label}: step", step, steps, t0, f"KL {loss.item():.4f}", keep=False)
        if save and step % save[0] == 0 and step < steps:
            save[1](step, opt, sched)


@contextlib.contextmanager
def swapped(model, swaps, checkpoint):
    """`model` with every (name, new, original) swap made, and its blocks activation-checkpointed if `checkpoint`;
    the originals are back in place on exit, whatever happened."""
    try:
        for name, new, _ in swaps:
            llama.swap_module(model, name, new)
        if checkpoint:
            for l, block in enumerate(model.layers):
                llama.swap_module(model, f"layers.{l}", Checkpointed(block))
        yield
    finally:
        for l, block in enumerate(model.layers):
            if isinstance(block, Checkpointed):
                llama.swap_module(model, f"layers.{l}", block.block)
        for name, _, old in swaps:
            llama.swap_module(model, name, old)


def check_pass_memory(fp, device, bits, codes):
    """Refuse, before the pass, one whose tensors alone outgrow the device: the reference `fp` in its own dtype,
    beside the quantized model (its linears packed, plus their codes unpacked to a byte each, the rest in fp32), and
    with `codes` 16 bytes per quantized weight for r, its gradient and Adam's moments (LLaMA-2-7B on a GPU:
    13 + 1 + 8 GB, and 104 GB more with codes)."""
    P = sum(p.numel() for p in fp.parameters())
    L = sum(m.weight.numel() for b in fp.layers for m in b.modules() if isinstance(m, nn.Linear))
    cuda = str(device).startswith("cuda")
    need = sum(p.numel() * p.element_size() for p in fp.parameters()) + 4 * (P - L) + L * (bits / 8 + 1) + \
        (16 * L if codes else 0)
    what = f"the end-to-end pass{' with --finetune_codes' if codes else ''}"
    if not cuda:
        return llama.check_memory(need, what)
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if need > total:
        raise UserError(f"{what} needs at least {need / 2 ** 30:.1f} GiB on {device}, which has "
                        f"{total / 2 ** 30:.1f} GiB")


def finetune(model, ref, samples, steps, lr, seed, device, transforms=False, codes=0.0):
    """Learn every group's scale by Adam on KL(ref || model) of the next-token distribution over the calibration
    tokens, every integer code frozen (EfficientQAT's last phase learns the scales); with `codes`, the codes too, by
    straight-through rounding of a latent code (LatentCodes) that moves at most about `codes` grid steps; with
    `transforms`, every learned transform's angles and K x K factor too, at the scales' rate (SpinQuant and OSTQuant
    learn rotations end to end; here that costs perplexity: README). Fixed (dense) transforms stay fixed. The
    quantized modules of `model` are updated in place; a NaN stops with nothing changed.
    Returns the mean KL on the first four chunks it learns on, before and after, the share of codes that moved,
    and the seconds it took."""
    t0 = time.time()
    kl, order, probe = kl_setup(model, ref, samples, seed, device)
    kl_before = probe()
    swaps = []      # (name, trainable, original): QuantLinear -> ScaledCodes, learned OnlineTransform -> Transform
    for name, mod in list(model.named_modules()):
        if isinstance(mod, llama.QuantLinear):
            swaps.append((name, (LatentCodes if codes else ScaledCodes)(mod), mod))
        elif transforms and isinstance(mod, llama.OnlineTransform) and not mod.dense:
            swaps.append((name, bq.Transform.from_export(mod.entry, mod.theta, mod.Q if mod.K > 1 else None)
                          .to(device), mod))
    with swapped(model, swaps, str(device).startswith("cuda")):
        latent = [p for _, new, _ in swaps for n, p in new.named_parameters() if n == "r"]
        rest = [p for _, new, _ in swaps for n, p in new.named_parameters() if n != "r"]
        code_lr = 2 * codes / steps
        descend_kl(kl, order, [dict(params=rest)] + ([dict(params=latent, lr=code_lr)] if latent else []),
                   steps, lr, "end-to-end pass", t0)
        with torch.no_grad():
            writes, moved = [], []      # (buffer, new value): all made and checked before any is written
            for _, new, old in swaps:
                if isinstance(new, LatentCodes):
                    q = new.codes()
                    if not torch.isfinite(q).all():
                        raise bq.LearningError("end-to-end pass: a latent code became non-finite")
                    writes.append((old.qweight, bq.pack(q.to(torch.uint8), old.bits)))
                    moved.append(((q != new.q).sum().item(), q.numel()))
                if isinstance(new, ScaledCodes):
                    writes.append((old.scales, new.scale().half()))
                else:
                    _, theta, Q = new.export()
                    writes += [(old.theta, theta)] + ([(old.Q, Q)] if Q is not None else [])
            if not all(torch.isfinite(v).all() for _, v in writes if v.is_floating_point()):
                raise bq.LearningError("end-to-end pass: a scale or angle became non-finite (or beyond fp16)")
            for buf, v in writes:
                buf.copy_(v)
    res = dict(steps=steps, lr=lr, kl_before=round(kl_before, 5), kl_after=round(probe(), 5),
               seconds=round(time.time() - t0, 1), device=str(device))
    if codes:
        res.update(code_lr=round(code_lr, 6), codes_moved=round(sum(m for m, _ in moved) / sum(n for _, n in moved), 6))
    share = f", {100 * res['codes_moved']:.2f}% of the codes moved" if codes else ""
    evaluation.say(f"end-to-end pass: {steps} steps, KL on 4 of its chunks {res['kl_before']:.4f} -> "
                   f"{res['kl_after']:.4f}{share}, {evaluation.fmt_time(res['seconds'])}")
    model.cpu()
    ref.cpu()
    return res


# -----------------------------------------------------------------------------
# the kl objective: every transform at once, before any block is quantized, against the unquantized model
#
#   min_{T}  KL( p(. | fp model)  ||  p(. | model with every linear y = Q(W T_s^T) (T_s x)) ),  Q straight-through RTN
#
# on min-max ranges (kl_quantizer rtn) or on the clip search's, recomputed every `refresh` steps (rtnclip: the final
# RTN's ranges, less its H-scored choice per row; rtnh, the default under --rtn: the final RTN's ranges, H-scored
# choice included, H_s from the unquantized model's inputs at site s); or, with kl_quantizer gptq (the default
# under GPTQ), Q(W') = W' - (W' - RTN(W')) F(T_s H_s T_s^T): GPTQ's error model, H_s from the unquantized model's
# inputs at site s; with kl_quantizer gptaq (for --gptaq) the same on gptaq's target W* = W + alpha W D_s H~_s^-1
# (bq.gptaq_target, H~_s and D_s from the straight-through model's inputs at site s against the unquantized
# model's, site after site as the file's GPTQ finds them, recomputed with F). SpinQuant learns its rotations this way (then quantizes
# with GPTQ), OSTQuant with KL as here. The transforms are then fixed, and the block loop quantizes Q(W T^T) with
# the final quantizer (GPTQ on T H T^T, or RTN).

class FakeQuantLinear(nn.Module):
    """y = x Q(W T^T)^T, the rows of Q(W T^T) being Q(T w): the site's slot applies T to x online, so y = W x up
    to Q's error, and gradients reach T through both, and the clip factors sigmoid(gamma) (2, out, groups) when
    given. With `feedback` = F(T H T^T) set, Q is GPTQ's stand-in (bq.fake_quant_gptq_ste) on the grid of the
    learned clip factors, else of the fixed ones in `grid`; without it, straight-through RTN on the learned clip
    factors, else on `grid` (kl_quantizer rtnclip or rtnh), else min-max. With `target` set (kl_quantizer gptaq),
    Q quantizes W* = target in place of W, as GPTQ under --gptaq does."""

    def __init__(self, weight, T, qc, gamma=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.T, self.qc, self.gamma = T, qc, gamma
        self.feedback = self.grid = self.target = None

    def forward(self, x):   # (..., in) -> (..., out)
        Wr = self.T(self.weight if self.target is None else self.target)                    # (out, in)
        if self.feedback is None:
            return F.linear(x, bq.fake_quant_ste(Wr, self.qc, self.gamma if self.gamma is not None else self.grid))
        return F.linear(x, bq.fake_quant_gptq_ste(Wr, self.feedback, self.qc,
                                                  self.gamma if self.gamma is not None else self.grid))


@torch.no_grad()
def site_hessians(model, samples, device):
    """H = X X^T / N at every site of `model` over the calibration samples (one at a time): {(layer, slot): H},
    summed in float64 on `device`, returned in float32 in host memory: sum(n^2) floats (22 GB for LLaMA-2-7B) that
    need not sit on the device beside the two models while the objective learns."""
    acc, hooks, t0 = {}, [], time.time()
    for l, block in enumerate(model.layers):
        for slot, linears in SITES:
            def hook(mod, inp, key=(l, slot)):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                acc[key] = acc.get(key, 0) + x.T @ x
            hooks.append(block.get_submodule(linears[0]).register_forward_pre_hook(hook))
    try:
        for i in range(len(samples)):
            model(samples[i:i + 1].to(device))
            evaluation.progress_line("kl objective: collecting H", i + 1, len(samples), t0, "samples", keep=False)
    finally:
        for h in hooks:
            h.remove()
    if not all(torch.isfinite(h).all() for h in acc.values()):
        raise UserError(NON_FINITE)
    return {k: (acc.pop(k) / samples.numel()).float().cpu() for k in list(acc)}


@torch.no_grad()
def gptaq_targets(model, ref, sites, samples, alpha, qc, device):
    """kl_quantizer gptaq: every stand-in's target W* = bq.gptaq_target(W, H~, D, alpha), found as the file's GPTQ
    under --gptaq finds it: block by block and site by site (true-sequential), H~ = X~ X~^T / N and
    D = (X - X~) X~^T / N (float64) from the straight-through `model`'s inputs X~ at the site, every site before it
    already on its new target, against the unquantized `ref`'s X, both before T. Targets fitted to one pass of the
    whole straight-through model at once would each undo an upstream error that the upstream sites are undoing
    too: the stand-in would overshoot (README). sites: [(T, (layer, slot), [FakeQuantLinear])], in model order."""
    n_tok = samples.numel()
    x = [model.tok_embeddings(samples[i:i + 1].to(device)) for i in range(len(samples))]    # (1, T, dim) each
    xr = [ref.tok_embeddings(samples[i:i + 1].to(device)) for i in range(len(samples))]
    cos, sin = model.rope(0, samples.shape[1], device)
    for l, (block, rblock) in enumerate(zip(model.layers, ref.layers)):
        inner = block.block if isinstance(block, Checkpointed) else block
        here = [s for s in sites if s[1][0] == l]
        ref_out = [block_with_inputs(rblock, [slot for _, (_, slot), _ in here], xri, cos, sin) for xri in xr]
        for T, (_, slot), fakes in here:
            H, D = 0, 0
            for xi, (_, xu) in zip(x, ref_out):  # the slot's T sees x before the site's linears run T on their weights
                xq = site_input(inner, slot, xi, cos, sin)                                  # (tokens, n)
                H, D = H + (xq.T @ xq).double(), D + ((xu[slot] - xq).T @ xq).double()
            if not (torch.isfinite(H).all() and torch.isfinite(D).all()):
                raise UserError(NON_FINITE)
            for f in fakes:
                f.target = bq.gptaq_target(f.weight, H / n_tok, D / n_tok, alpha)
                f.grid = bq.clip_logits(T(f.target), qc)
        x = [block(xi, cos, sin) for xi in x]
        xr = [y for y, _ in ref_out]


def check_kl_memory(model, device, hessians, feedback, stats=False):
    """Refuse, before any work, a kl objective whose tensors alone outgrow the device (or, for H, host memory):
    the model in fp32 and the reference in its own dtype, plus with the GPTQ stand-in (`feedback`) F at every site,
    sum(n^2) floats; with H at every site (`hessians`: the gptq and rtnh stand-ins) H waits in host memory, and
    before learning is summed in float64 on the device beside the model alone (LLaMA-2-7B: 27 + 13 + 22 GB
    learning with F, 27 + 44 GB summing; 22 GB of H in host memory). The gptaq stand-in (`stats`) adds W* at every
    linear and H~ and D in float64 at one site at a time, beside everything else (LLaMA-2-7B: another 27 + 2 GB)."""
    params = list(model.parameters())
    P, ref_bytes = sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    n = [model.layers[0].get_submodule(names[0]).in_features for _, names in SITES]
    sites = len(model.layers) * sum(k * k for k in n) * 4 if hessians else 0      # bytes of F (or of H) in fp32
    if hessians:
        llama.check_memory(sites, "the kl objective's stand-in (H at every site, in host memory)")
    extra = 4 * P + 16 * max(n) ** 2 if stats else 0
    if stats and not str(device).startswith("cuda"):
        llama.check_memory(extra, "the gptaq stand-in (W* at every linear, H~ and D at a site in float64)")
    if str(device).startswith("cuda"):
        need = 4 * P + max(ref_bytes + (sites if feedback else 0) + extra, 2 * sites)
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        if need > total:
            raise UserError(f"the kl objective needs at least {need / 2 ** 30:.1f} GiB on {device} (the model in fp32, "
                            f"the reference{', GPTQ feedback at every site' if feedback else ''}), which has "
                            f"{total / 2 ** 30:.1f} GiB: use --objective layer (one site at a time)")


def learn_kl(model, ref, samples, cc, qc, lc, save=None, resume=None):
    """The kl objective on the unquantized `model` (left as it was): lc.steps Adam steps from lc.init, the angles
    at lc.lr (a learned butterfly; a fixed rotation stays fixed) and, with lc.lwc, every group's clip factors at
    lc.clip_lr, started from the clip search. Each site is seeded as the other objectives seed it. Never ends
    worse than its start on the probe chunks. save(state) is given the whole state every lc.refresh steps (just
    before a recomputation of the stand-in, which rebuilds everything else from it); resume: such a state, from
    which the descent goes on exactly as it would have.
    Returns ({(layer, slot): Transform} learned, {(layer, linear): gamma}, dict(kl_before, kl_after, seconds))."""
    t0, dev = time.time(), cc.device
    kl, order, probe = kl_setup(model, ref, samples, cc.seed, dev)
    transforms, gammas, swaps, sites = {}, {}, [], []      # swaps: (name, new, original); sites: (T, key, linears)
    for block in model.layers:
        block.float()
    hessians = None
    if lc.kl_quantizer in ("gptq", "gptaq", "rtnh"):     # the reference waits in host memory while the float64 sums take its place
        ref.cpu()
        hessians = site_hessians(model, samples, dev)
        ref.to(dev)
    for l, block in enumerate(model.layers):
        for s_i, (slot, linears) in enumerate(SITES):
            n, seed = block.get_submodule(linears[0]).in_features, cc.seed * 1000003 + 4 * l + s_i
            if cc.rotation == "butterfly":
                T = transforms[(l, slot)] = bq.Transform(n, lc.init, torch.Generator().manual_seed(seed)).to(dev)
            elif cc.rotation == "none":
                T = nn.Identity()
            else:       # fixed: the very T the block loop quantizes with
                T = llama.OnlineTransform(dict(n=n, dense=True, kind=cc.rotation, seed=seed)).to(dev)
            swaps.append((f"layers.{l}.{slot}", T, block.get_submodule(slot)))
            for name in linears:
                lin = block.get_submodule(name)
                W = lin.weight.detach().to(dev)
                if lc.lwc:
                    with torch.no_grad():
                        gammas[(l, name)] = bq.clip_logits(T(W), qc).requires_grad_(True)
                swaps.append((f"layers.{l}.{name}", FakeQuantLinear(W, T, qc, gammas.get((l, name))), lin))
            sites.append((T, (l, slot), [new for _, new, _ in swaps[-len(linears):]]))

    @torch.no_grad()
    def refresh():      # the gptq stand-in's F(T H T^T); the clip search's grid where no clip factors are learned
        for T, key, fakes in sites:
            Hr = None       # rtnclip: the unweighted search's grid alone
            if hessians is not None:
                M = T.matrix() if isinstance(T, bq.Transform) else T.M if isinstance(T, llama.OnlineTransform) else None
                H = hessians[key].to(dev)                                                   # (n, n)
                Hr = H if M is None else M @ H @ M.T                                        # H of the inputs T x
            feedback = bq.gptq_feedback(Hr) if lc.kl_quantizer in ("gptq", "gptaq") else None
            for f in fakes:
                f.feedback = feedback
                W = f.weight if f.target is None else f.target
                if f.gamma is None:
                    f.grid = bq.clip_logits(T(W), qc) if feedback is not None else bq.clip_grid(T(W), qc, Hr)
        if lc.kl_quantizer == "gptaq":      # the targets the file's GPTQ would fit with the transforms as they now are
            gptaq_targets(model, ref, sites, samples[:GPTAQ_SAMPLES], cc.gptaq, qc, dev)
    groups = [dict(params=[p for T in transforms.values() for p in T.parameters()], lr=lc.lr),
              dict(params=list(gammas.values()), lr=lc.clip_lr)]
    every = (lc.refresh, refresh) if lc.kl_quantizer != "rtn" else None

    def state(step, opt, sched):    # the stand-in (F, grids, gptaq's targets) is rebuilt from it by the next refresh
        return dict(step=step, opt=opt.state_dict(), sched=sched.state_dict(), before=before, start=start,
                    transforms=[T.state_dict() for T in transforms.values()], gammas=[g.detach() for g in gammas.values()])
    with swapped(model, swaps, str(dev).startswith("cuda")):
        if resume is None:
            if every:
                refresh()
            before = probe()
            if not math.isfinite(before):
                raise UserError(NON_FINITE)
            evaluation.say(f"kl objective: KL of the straight-through {lc.kl_quantizer.upper()} model on 4 chunks at the "
                           f"start {before:.4f} (a finished file's own: the start of its --finetune_from pass)")
            start = [copy.deepcopy(T.state_dict()) for T in transforms.values()], [g.detach().clone() for g in gammas.values()]
        else:       # ValueError: a saved state this run cannot go on from
            want = dict(transforms=len(transforms), gammas=len(gammas))
            try:
                before, start = float(resume["before"]), resume["start"]
                got = {k: len(resume[k]) for k in want}
                if got != want or (len(start[0]), len(start[1])) != (want["transforms"], want["gammas"]) \
                        or not 0 < resume["step"] < lc.steps:
                    raise ValueError(f"{got} after step {resume['step']}, want {want} before step {lc.steps}")
                with torch.no_grad():
                    for T, st in zip(transforms.values(), resume["transforms"]):
                        T.load_state_dict(st)
                    for g, v in zip(gammas.values(), resume["gammas"]):
                        g.copy_(v)
            except (KeyError, TypeError, IndexError, RuntimeError) as e:
                raise ValueError(f"{type(e).__name__}: {e}") from None
            print(f"kl objective: resuming after step {resume['step']} of {lc.steps}", file=sys.stderr)
        descend_kl(kl, order, [g for g in groups if g["params"]], lc.steps, lc.lr, "kl objective", t0, every,
                   save and (lc.refresh, lambda step, opt, sched: save(state(step, opt, sched))), resume)
        if every:
            refresh()
        after = probe()
        if not after <= before:
            for T, st in zip(transforms.values(), start[0]):
                T.load_state_dict(st)
            for g, g0 in zip(gammas.values(), start[1]):
                g.data.copy_(g0)
            after = before
    model.cpu()
    ref.cpu()
    for t in list(transforms.values()) + list(gammas.values()):
        t.requires_grad_(False)
    res = dict(kl_before=round(before, 5), kl_after=round(after, 5), seconds=round(time.time() - t0, 1))
    evaluation.say(f"kl objective: {lc.steps} steps, KL of the straight-through {lc.kl_quantizer.upper()} model on 4 chunks "
                   f"{res['kl_before']:.4f} -> {res['kl_after']:.4f}, {evaluation.fmt_time(res['seconds'])}")
    return transforms, gammas, res


def kl_learned(model, samples, cc, qc, lc, partial, sett):
    """learn_kl, kept in OUT.partial/kl_transforms.safetensors: a resumed run reads them back. While it learns,
    its state every lc.refresh steps is kept in OUT.partial/kl_state.pt: a run killed then goes on from there."""
    path, state_path = os.path.join(partial, "kl_transforms.safetensors"), os.path.join(partial, "kl_state.pt")
    linears = [(l, name) for l in range(len(model.layers)) for _, names in SITES for name in names]
    if os.path.isfile(path):
        header, tensors = llama.read_safetensors(path)
        try:
            llama.check_finite(tensors, path)
            transforms = {(int(k.split(".")[1]), k.split(".", 2)[2]): bq.Transform.from_export(
                e, tensors[f"{k}.theta"], tensors.get(f"{k}.Q")).to(cc.device) for k, e in header["transforms"].items()}
            gammas = {(l, name): tensors[f"layers.{l}.{name}.gamma"].to(cc.device) for l, name in linears} \
                if lc.lwc else {}
            want = len(model.layers) * len(SITES) if cc.rotation == "butterfly" else 0
            if len(transforms) != want:
                raise ValueError(f"{len(transforms)} transforms, want {want}")
            return transforms, gammas, header["kl"]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{path}: {e}; delete {partial} to start over") from None
    resume = None
    if os.path.isfile(state_path):
        try:
            resume = torch.load(state_path, map_location="cpu", weights_only=True)
            saved = [v for st in resume["transforms"] for v in st.values()] + resume["gammas"]
            llama.check_finite({f"{i}": t for i, t in enumerate(saved)}, state_path)
        except (EOFError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, pickle.UnpicklingError) as e:
            raise UserError(f"{state_path}: not a kl objective's saved state ({type(e).__name__}); delete {partial} "
                            f"to start over") from None

    def save(state):
        start_partial(partial, sett)
        llama.write_atomic(state_path, lambda tmp: torch.save(state, tmp))
    ref = llama.load(cc.ckpt)[0]
    try:
        transforms, gammas, res = learn_kl(model, ref, samples, cc, qc, lc, save, resume)
    except bq.LearningError as e:
        saved = f" and delete {partial} (its saved state was learned at this rate)" if os.path.isfile(state_path) else ""
        raise UserError(f"{e}: lower --lr" + (" or --clip_lr" if lc.lwc else "") + saved) from None
    except ValueError as e:
        if resume is None:
            raise
        raise UserError(f"{state_path}: a saved state that does not fit this run ({e}); delete {partial} to start "
                        f"over") from None
    tensors, entries = {f"layers.{l}.{name}.gamma": g.cpu() for (l, name), g in gammas.items()}, {}
    for (l, slot), T in transforms.items():
        entries[f"layers.{l}.{slot}"], tensors[f"layers.{l}.{slot}.theta"], Q = T.export()
        if Q is not None:
            tensors[f"layers.{l}.{slot}.Q"] = Q
    start_partial(partial, sett)
    llama.write_safetensors(path, tensors, dict(transforms=entries, kl=res))
    if os.path.exists(state_path):
        os.remove(state_path)
    return transforms, gammas, res


def pass_settings(cc, bits):
    """What the end-to-end pass adds to a file's settings (PASS_KEYS)."""
    return dict(finetune=cc.finetune, finetune_lr=cc.finetune_lr or finetune_lr(bits),
                finetune_transforms=cc.finetune_transforms, **({"finetune_codes": cc.finetune_codes} if cc.finetune_codes else {}))


def finetune_file(cc, src, out, eval_files=(), eval_seqlen=2048):
    """The end-to-end pass on a finished calibrate.py file `src` (read, never written) -> `out`, on the same
    calibration tokens the file was made with. Returns the summary dict that calibrate() returns."""
    header = llama.read_safetensors(src, tensors=False)[0]
    try:
        sett, bits = header["settings"], int(header["quant"]["bits"])
        made = replace(cc, **{k: sett[k] for k in ("calib", "nsamples", "seqlen", "seed")})
        fingerprint_made, source_made = sett["ckpt_fingerprint"], header["calib_source"]
        if not (isinstance(made.nsamples, int) and isinstance(made.seqlen, int) and isinstance(made.seed, int)):
            raise TypeError("nsamples, seqlen and seed must be integers")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{src}: its header lacks the calibration settings ({type(e).__name__}: {e}); "
                        f"not a calibrate.py file of this version") from None
    if sett.get("finetune"):
        raise UserError(f"{src} already had an end-to-end pass ({sett['finetune']} steps)")
    fp = llama.load(cc.ckpt)[0]
    if fingerprint(fp) != fingerprint_made:
        raise UserError(f"{src} was calibrated from other weights than --ckpt {cc.ckpt}")
    model, tok = llama.load_quantized(src)
    for path in eval_files:     # fail now, not after the pass
        evaluation.windows(evaluation.tokenize_corpus(tok, path), min(eval_seqlen, fp.args.max_seq_len))
    samples, source = calibration_samples(made, fp, tok)
    if source != source_made:
        raise UserError(f"{src} was calibrated on {source_made}; here the same settings find {source}")
    if sett.get("calib_fingerprint", tokens_fingerprint(samples)) != tokens_fingerprint(samples):
        raise UserError(f"{src} was calibrated on other tokens than {source} gives now (its text changed)")
    if (res := kept(out, dict(sett, **pass_settings(cc, bits)))) is not None:
        return res
    check_pass_memory(fp, cc.device, bits, cc.finetune_codes)
    try:
        ft = finetune(model, fp, samples, cc.finetune, cc.finetune_lr or finetune_lr(bits), made.seed, cc.device,
                      cc.finetune_transforms, cc.finetune_codes)
    except bq.LearningError as e:
        raise UserError(f"{e}: lower --finetune_lr") from None
    info = {k: v for k, v in header.items() if k not in ("format", "config", "tokenizer", "quant", "transforms")}
    info.update(settings=dict(sett, **pass_settings(cc, bits)), finetune=ft,
                calibration_seconds=round(header.get("calibration_seconds", 0.0) + ft["seconds"], 1))
    llama.save_quantized(out, model, tok, header["quant"], **info)
    print(f"wrote {out}", file=sys.stderr)
    return dict(out=out, bits_per_weight=header.get("bits_per_weight"),
                calibration_seconds=info["calibration_seconds"], finetune=ft, settings=info["settings"])


# -----------------------------------------------------------------------------
# the results grid, as data: cells (bits, group, final quantizer) x rows (rotation and objective) x seeds

SWEEP_CELLS = [(2, 64, "gptq"), (3, 128, "gptq"), (2, 64, "rtn"), (3, 128, "rtn")]
SWEEP_ROWS = [("none", dict(rotation="none")), ("hadamard", dict(rotation="hadamard")),
              ("random", dict(rotation="random")), ("butterfly-layer", dict(rotation="butterfly")),
              ("butterfly-gptq", dict(rotation="butterfly", objective="gptq")),
              ("butterfly-block", dict(rotation="butterfly", objective="block")),
              ("butterfly-block-lwc", dict(rotation="butterfly", objective="block", lwc=True)),
              ("butterfly-block-fpin", dict(rotation="butterfly", objective="block", block_input="fp")),
              ("butterfly-blockgptq", dict(rotation="butterfly", objective="block", kl_quantizer="gptq")),  # GPTQ cells
              ("butterfly-kl", dict(rotation="butterfly", objective="kl")),     # against min-max RTN in every cell
              ("hadamard-kl-lwc", dict(rotation="hadamard", objective="kl", lwc=True)),     # clip factors only
              ("butterfly-kl-lwc", dict(rotation="butterfly", objective="kl", lwc=True)),
              ("none-kl-lwc", dict(rotation="none", objective="kl", lwc=True)),             # clip factors only
              ("butterfly-klgptq", dict(rotation="butterfly", objective="kl", kl_quantizer="gptq")),  # GPTQ cells
              ("butterfly-klgptq-160", dict(rotation="butterfly", objective="kl", kl_quantizer="gptq", steps=160)),
              ("butterfly-klgptq-lwc", dict(rotation="butterfly", objective="kl", kl_quantizer="gptq", lwc=True)),
              ("butterfly-klclip", dict(rotation="butterfly", objective="kl", kl_quantizer="rtnclip")),  # RTN cells
              ("butterfly-klh", dict(rotation="butterfly", objective="kl", kl_quantizer="rtnh")),        # RTN cells
              ("hadamard-e2e", dict(rotation="hadamard", base="hadamard")),     # + the end-to-end pass
              ("butterfly-gptq-e2e", dict(rotation="butterfly", objective="gptq", base="butterfly-gptq")),
              ("butterfly-kl-e2e", dict(rotation="butterfly", objective="kl", base="butterfly-kl")),
              ("butterfly-klgptq-e2e", dict(rotation="butterfly", objective="kl", kl_quantizer="gptq",
                                            base="butterfly-klgptq"))]
SWEEP_SEEDS = (0, 1, 2)      # the default; --sweep_seeds adds more (other calibration tokens, other random signs)
SWEEP_FINETUNE = 80         # end-to-end steps of the -e2e rows, 1024 tokens each


def sweep_grid(seeds=SWEEP_SEEDS):
    """(tag, row) for every cell, row and seed; the stand-in rows only where their quantizer is the cell's."""
    return [(f"w{b}g{g}-{q}-{name}-s{seed}", dict(row, bits=b, group=g, gptq=q == "gptq", seed=seed,
                                                   **({"base": f"w{b}g{g}-{q}-{row['base']}-s{seed}"} if "base" in row
                                                      else {})))
            for b, g, q in SWEEP_CELLS for name, row in SWEEP_ROWS for seed in seeds
            if row.get("kl_quantizer", "rtn") in (("rtn", "gptq") if q == "gptq" else ("rtn", "rtnclip", "rtnh"))]


def sweep_rows(only=(), seeds=SWEEP_SEEDS):
    """The grid's rows (fp first) that `only` selects: a full tag selects itself alone, a row without its seed
    its seeds alone (w2g64-gptq-hadamard: not w2g64-gptq-hadamard-e2e-s0); any other string matches as a substring."""
    grid = sweep_grid(seeds)
    tags = {t for t, _ in grid}
    rows = {t.rsplit("-s", 1)[0] for t in tags}
    picks = lambda o, t: o == t if o in tags else o == t.rsplit("-s", 1)[0] if o in rows else o in t   # noqa: E731
    for o in only:
        if not any(picks(o, t) for t in tags):
            raise UserError(f"--sweep_only {o!r} selects no row of the grid with seeds {','.join(map(str, seeds))} "
                            f"(a seed outside them needs --sweep_seeds)")
    return [("fp", None)] + [(t, x) for t, x in grid if not only or any(picks(o, t) for o in only)]


def sweep(cc, qc, only, eval_files, eval_limit, seeds=SWEEP_SEEDS, path=os.path.join("out", "sweep.jsonl")):
    """Every selected row through calibrate() with its objective's default learning settings, then perplexity,
    KL and top-1 agreement against the unquantized model on every eval file. Finished rows are kept in `path`:
    a rerun continues where it stopped. Prints the table: mean and spread (min-max) over seeds."""
    done, names = {}, [os.path.basename(f) for f in eval_files]
    grid = dict(ckpt=cc.ckpt, calib=cc.calib, nsamples=cc.nsamples, seqlen=cc.seqlen, eval_limit=eval_limit)
    if os.path.isfile(path):
        for i, line in enumerate(open(path), 1):
            try:
                r = json.loads(line)
                done[r["tag"]] = r
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} line {i}: not a sweep result; fix or delete the line") from None
            for k, v in grid.items():       # rows written before ckpt, calib and seqlen were recorded: the defaults
                was = r.get(k, dict(ckpt="smollm2-135m", calib=None, seqlen=2048).get(k))
                if was != v:
                    raise UserError(f"{path} line {i} ({r['tag']}) was made with {k} {was}, this run has {v}: one "
                                    f"file holds one grid; move {path} aside to start another")
            if "-e2e-" in r["tag"] and r.get("finetune_transforms") is not False:
                raise UserError(f"{path} line {i} ({r['tag']}) is a pass that learned the transforms too (made before "
                                f"the pass learned the scales alone); move {path} aside to start another grid")
            if any(n not in r for n in names):
                raise UserError(f"{path} line {i} ({r['tag']}) was not evaluated on "
                                f"{next(n for n in names if n not in r)}; move {path} aside to start another grid")
    fp, tok = llama.load(cc.ckpt)
    fp.to(cc.device)
    data = {n: evaluation.tokenize_corpus(tok, f) for n, f in zip(names, eval_files)}
    for tag, row in sweep_rows(only, seeds):
        if tag in done:
            continue
        r = dict(tag=tag, device=cc.device, **grid)
        if row is None:
            r.update(bits_per_weight=16.0, calibration_seconds=0.0)
            for name, ids in data.items():
                r[name] = dict(ppl=evaluation.perplexity(fp, ids, cc.seqlen, eval_limit))
        else:
            qrow = replace(qc, bits=row["bits"], group=row["group"], gptq=row["gptq"])
            lrow = bq.LearnConfig(objective=row.get("objective", "layer"), lwc=row.get("lwc", False),
                                  kl_quantizer=row.get("kl_quantizer", "rtn"), steps=row.get("steps"),
                                  block_input=row.get("block_input", "quantized"))
            crow, out = replace(cc, rotation=row["rotation"], seed=row["seed"]), f"out/sweep-{tag}.safetensors"
            if "base" in row:       # the end-to-end pass on the base row's file (calibrated first if missing)
                src = f"out/sweep-{row['base']}.safetensors"
                if not os.path.isfile(src):
                    calibrate(crow, qrow, lrow, src)
                made_as(src, settings(crow, qrow, lrow), f"row {tag} asks of its base")
                r.update(finetune_transforms=False)
                erow = replace(crow, finetune=SWEEP_FINETUNE, finetune_lr=crow.finetune_lr or finetune_lr(qrow.bits))
                if os.path.isfile(out):
                    res = made_as(out, settings(erow, qrow, lrow), f"row {tag} asks")
                else:
                    fp.cpu()        # finetune_file holds its own reference model
                    res = finetune_file(replace(crow, finetune=SWEEP_FINETUNE), src, out)
                    fp.to(cc.device)
            elif os.path.isfile(out):       # written, then stopped while it was evaluated: keep it
                res = made_as(out, settings(crow, qrow, lrow), f"row {tag} asks")
            else:
                res = calibrate(crow, qrow, lrow, out)
            model = llama.load(res["out"])[0].to(cc.device)
            r.update(bits_per_weight=res["bits_per_weight"], calibration_seconds=res["calibration_seconds"])
            for name, ids in data.items():
                r[name] = evaluation.compare(fp, model, ids, cc.seqlen, eval_limit)
            del model
        print(json.dumps(r), flush=True)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        done[tag] = r
    print(sweep_table(done, list(data), seeds))


def made_as(path, want, what):
    """A finished file's summary (as calibrate() returns it) when it was made with the settings `want`; refused
    otherwise, so that a rerun never evaluates, or starts from, a file some other command wrote."""
    header = llama.read_safetensors(path, tensors=False)[0]
    if {k: v for k, v in header.get("settings", {}).items() if k not in FINGERPRINTS} != json.loads(json.dumps(want)):
        raise UserError(f"{path} was made with other settings than {what}; move it aside")
    return file_summary(path, header)


def sweep_table(done, names, seeds=SWEEP_SEEDS):
    """Markdown: one line per cell and row, mean [min-max] over the seeds that finished."""
    lines = ["| cell | row | seeds | " + " | ".join(f"{n} ppl | {n} KL" for n in names) + " | calib s |",
             "|---|---|---|" + "---|---|" * len(names) + "---|"]
    if "fp" in done:
        lines.append("| fp | - | - | " + " | ".join(f"{done['fp'][n]['ppl']:.3f} | 0" for n in names) + " | - |")
    for b, g, q in SWEEP_CELLS:
        for name, _ in SWEEP_ROWS:
            rs = [done[t] for t in (f"w{b}g{g}-{q}-{name}-s{s}" for s in seeds) if t in done]
            if not rs:
                continue
            cell = []
            for n in names:
                for k in ("ppl", "kl"):
                    v = [r[n][k] for r in rs]
                    cell.append(f"{sum(v) / len(v):.4g} [{min(v):.4g}-{max(v):.4g}]" if len(v) > 1 else f"{v[0]:.4g}")
            secs = sum(r["calibration_seconds"] for r in rs) / len(rs)
            lines.append(f"| w{b}g{g} {q} | {name} | {len(rs)} | " + " | ".join(cell) + f" | {secs:.0f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line

def expected_settings(cc, qc, lc, finetune_from=None):
    """The settings (fingerprints aside) of the file this command writes: calibrate()'s, or for --finetune_from
    its source's with the pass's steps and learning rate."""
    if finetune_from is None:
        lr = cc.finetune_lr or (finetune_lr(qc.bits) if cc.finetune else None)
        return settings(replace(cc, finetune_lr=lr), qc, lc)
    header = llama.read_safetensors(finetune_from, tensors=False)[0]
    try:
        src, bits = {k: v for k, v in header["settings"].items() if k not in FINGERPRINTS}, int(header["quant"]["bits"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{finetune_from}: its header lacks the calibration settings; not a calibrate.py file of "
                        f"this version") from None
    return dict(src, **pass_settings(cc, bits))


def pass_tag(cc):
    """The end-to-end pass in a default file name: its steps, t with the transforms learned, c with the codes (cD
    where they move up to D grid steps, D not the default)."""
    codes = "" if not cc.finetune_codes else "c" if cc.finetune_codes == FINETUNE_CODE_DRIFT else f"c{cc.finetune_codes:g}"
    return f"{cc.finetune}{'t' if cc.finetune_transforms else ''}{codes}"


def parse_args(argv=None):
    """Flags -> (CalibConfig, QuantConfig, LearnConfig, the other options)."""
    p = llama.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m", help="named checkpoint, Meta/HF directory or .gguf")
    p.add_argument("--out", default=None, help="output .safetensors (default: out/<ckpt>-<settings>.safetensors)")
    p.add_argument("--rotation", default="butterfly", choices=["none", "hadamard", "random", "butterfly"])
    p.add_argument("--init", default=None, choices=["identity", "hadamard", "rhadamard", "random", "best"],
                   help="butterfly start (default: gptq and kl objectives rhadamard, kl on rtnclip/rtnh identity, else "
                        "best); 'best' starts from the better of identity and hadamard per site; 'rhadamard': "
                        "pi/4 + k pi/2 with random k, a randomised Hadamard")
    p.add_argument("--bits", "--w_bits", "--wbits", type=int, default=3, help="weight bits (2, 3, 4, 8)")
    p.add_argument("--group", "--w_groupsize", type=int, default=128, help="group size; 0 or -1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (default asymmetric)")
    p.add_argument("--no_clip", action="store_true", help="min-max range instead of the MSE clip search")
    p.add_argument("--gptq", action="store_true", default=True, help="GPTQ on the rotated weights (default)")
    p.add_argument("--rtn", "--w_rtn", dest="gptq", action="store_false", help="round to nearest instead of GPTQ")
    p.add_argument("--act_order", action="store_true", help="GPTQ column order by decreasing H diagonal")
    p.add_argument("--gptaq", type=float, default=0.0, metavar="ALPHA",
                   help="GPTQ fits the unquantized model's outputs (GPTAQ's asymmetric calibration): each site's "
                        "target is moved the fraction ALPHA in [0, 1] toward the least-squares fit of the unquantized "
                        "path's outputs from the quantized path's inputs, collected site by site (per block: one "
                        "unquantized forward pass and two partial ones per site); 0: off")
    p.add_argument("--calib", "--cal_dataset", default=None,
                   help="calibration text (.txt or .jsonl), or wikitext2 (WikiText-103 valid locally, else WikiText-2 "
                        "train) or c4 (en train shard 00000), found in $BQ_DATA, ../shared/data, the cache, then the "
                        "Hugging Face hub (needs `pip install datasets`); several joined by + (wikitext2+c4) share "
                        "the samples evenly; default: local WikiText-103 valid, else data-free: text sampled from "
                        "the model itself")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration samples (default: 128, the paper's, on a GPU; 32 on CPU, where 128 x 2048 "
                        "tokens take ~40 minutes of forward passes for SmolLM2 on 2 cores; data-free on CPU: %d)"
                        % DATA_FREE_CPU[0])
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per sample and per evaluation window (default 2048; data-free on CPU: %d)"
                        % DATA_FREE_CPU[1])
    p.add_argument("--objective", default=None, choices=["layer", "gptq", "block", "kl"],
                   help="layer: each site alone, trace(E H E^T) under straight-through RTN (the paper's); gptq: each "
                        "site alone, GPTQ's expected loss; block: a block's four transforms jointly on the block's "
                        "output MSE; kl: every transform at once, before quantizing, on KL(unquantized || "
                        "straight-through RTN, or GPTQ's stand-in: --kl_quantizer) of the next-token distribution "
                        "(default: kl, against the final quantizer's stand-in; it beats every fixed choice in both GPTQ "
                        "cells and at W3 g128 RTN measured)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimisation steps per site (layer: 30, gptq: 300), block (block: 20) or model (kl: 80, "
                        "%d tokens each)" % FINETUNE_TOKENS)
    p.add_argument("--lr", type=float, default=None, help="learning rate (layer: 0.5, SGD; gptq: 0.02, block and kl: "
                                                          "0.01, Adam)")
    p.add_argument("--refresh", type=int, default=10, help="gptq objective, --kl_quantizer gptq, rtnclip, rtnh: steps "
                                                           "between recomputations of GPTQ's column weights or "
                                                           "feedback, or of the clip search's ranges")
    p.add_argument("--kl_quantizer", default=None, choices=["rtn", "rtnclip", "rtnh", "gptq", "gptaq"],
                   help="kl objective (block: rtn or gptq): the straight-through quantizer, min-max RTN (or the "
                        "learned clips); rtnclip: "
                        "RTN on the clip search's ranges, recomputed every --refresh steps; rtnh: on the ranges the "
                        "file's RTN picks, the clip search with its H-scored choice per row (H at every site); or gptq: RTN's rounding "
                        "error pushed forward through GPTQ's feedback F(T H T^T), on the clip search's grid or the "
                        "learned clips; gptaq (with --gptaq): gptq on --gptaq's target, its statistics from the "
                        "straight-through model, recomputed with F (default: the final quantizer's: gptq, or under "
                        "--rtn rtnh, rtn with --lwc)")
    p.add_argument("--block_batch", type=int, default=2, help="block objective: sequences per step")
    p.add_argument("--block_tokens", type=int, default=512, help="block objective: tokens per sequence it learns on")
    p.add_argument("--block_input", default="quantized", choices=["quantized", "fp"],
                   help="block objective: learn on the outputs of the blocks already quantized (EfficientQAT; the "
                        "default) or of the unquantized blocks (FlatQuant), against the unquantized block's outputs "
                        "on them")
    p.add_argument("--lwc", action="store_true",
                   help="block and kl objectives: learn per-group clip factors too, which then set the ranges of "
                        "the final quantizer (RTN or GPTQ); with a fixed --rotation the kl objective learns only them")
    p.add_argument("--clip_lr", type=float, default=None, help="learning rate of the clip factors (Adam; block: "
                                                               "5e-3, kl: 1e-2)")
    p.add_argument("--rows", type=int, default=512,
                   help="layer and gptq objectives: output rows per step (stochastic); 0 = all")
    p.add_argument("--checkpoints", type=int, default=1, help="layer and gptq objectives: times per site the "
                                                              "iterate is scored with the final quantizer (the best is kept)")
    p.add_argument("--optim", default=None, choices=["sgd", "adam"],
                   help="sgd = momentum 0.9; both cosine-decayed (default: layer sgd, the others adam; kl takes adam only)")
    p.add_argument("--lambda_unif", type=float, default=0.0,
                   help="layer and gptq objectives: weight of the uniformity regulariser")
    p.add_argument("--unif_tokens", type=int, default=256,
                   help="layer and gptq objectives: tokens per site kept for the regulariser")
    p.add_argument("--finetune", type=int, default=0,
                   help="steps of the end-to-end pass after the last block: every group scale by Adam on "
                        "KL(unquantized || quantized) over the calibration tokens, %d per step (0: none)"
                        % FINETUNE_TOKENS)
    p.add_argument("--finetune_lr", type=float, default=None,
                   help="the end-to-end pass's learning rate (default: 2e-3 at 2 bits, 2e-4 at 3 and more)")
    p.add_argument("--finetune_transforms", action="store_true",
                   help="the end-to-end pass learns every learned transform's angles and K x K factor too, at its "
                        "rate (default: the scales only; learning the angles there cost perplexity, README)")
    p.add_argument("--finetune_codes", type=float, nargs="?", const=FINETUNE_CODE_DRIFT, default=0.0, metavar="D",
                   help="the end-to-end pass moves the integer codes too, by straight-through rounding of a latent "
                        "code learning at 2 D / STEPS in grid steps, so that it moves at most about D (default "
                        f"{FINETUNE_CODE_DRIFT:g}; at 2, 8.7%% of SmolLM2's W2 codes move by noise and the model is "
                        "destroyed: README); 16 bytes more per weight than the scales alone")
    p.add_argument("--finetune_from", default=None,
                   help="run only the end-to-end pass, on this calibrate.py file of --ckpt (read, never written), "
                        "on the calibration tokens it was made with; writes --out")
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
                   help="comma-separated sweep rows to run: full tags (w2g64-gptq-hadamard-s0), a row's "
                        "seeds (w2g64-gptq-hadamard), or substrings such as w2g64")
    p.add_argument("--sweep_seeds", default=",".join(map(str, SWEEP_SEEDS)),
                   help="comma-separated seeds of every sweep row; the table gives mean and spread over them")
    a = p.parse_args(argv)
    try:
        sweep_seeds = tuple(int(x) for x in a.sweep_seeds.split(","))
    except ValueError:
        sweep_seeds = ()
    if not sweep_seeds or min(sweep_seeds) < 0 or len(set(sweep_seeds)) != len(sweep_seeds):
        raise UserError(f"--sweep_seeds {a.sweep_seeds!r}: give distinct non-negative integers such as 0,1,2")
    on_gpu = a.device.startswith("cuda")
    data_free_cpu = not on_gpu and a.calib is None and evaluation.find_dataset("wikitext2", "calib") is None
    nsamples = a.nsamples if a.nsamples is not None else (128 if on_gpu else DATA_FREE_CPU[0] if data_free_cpu else 32)
    seqlen = a.seqlen if a.seqlen is not None else (DATA_FREE_CPU[1] if data_free_cpu else 2048)
    cc = CalibConfig(a.ckpt, a.rotation, a.calib, nsamples, seqlen, a.seed, a.unif_tokens, a.batch_size, a.device,
                     a.finetune, a.finetune_lr, a.gptaq, a.finetune_transforms, a.finetune_codes)
    for name in ("nsamples", "seqlen", "batch_size", "unif_tokens"):
        if getattr(cc, name) < 1:
            raise UserError(f"--{name} must be positive")
    if cc.finetune < 0 or (cc.finetune_lr is not None and not 0 < cc.finetune_lr < 1) or \
            (a.finetune_from and cc.finetune < 1):
        raise UserError("--finetune must be >= 0 (>= 1 with --finetune_from) and --finetune_lr in (0, 1)")
    for flag in ("finetune_transforms", "finetune_codes"):
        if getattr(cc, flag) and not cc.finetune:
            raise UserError(f"--{flag} is a setting of the end-to-end pass: give --finetune STEPS")
    if not 0 <= cc.finetune_codes <= 8:
        raise UserError(f"--finetune_codes {cc.finetune_codes}: give grid steps in (0, 8]")
    if not 0 <= cc.gptaq <= 1 or (cc.gptaq and (a.sweep or a.finetune_from)):
        raise UserError("--gptaq must be in [0, 1], and not with --sweep (its rows are the default GPTQ) or "
                        "--finetune_from (the file is already quantized)")
    if not 0 <= cc.seed < 2 ** 32 or (a.eval_limit is not None and a.eval_limit < 1):
        raise UserError("--seed must be in [0, 2^32) and --eval_limit >= 1")
    llama.check_device(cc.device)
    objective = a.objective or "kl"
    stand_in = "gptq" if a.gptq else "rtn" if a.lwc or a.no_clip else "rtnh"     # the kl objective's default
    kl_quantizer = a.kl_quantizer or (stand_in if objective == "kl" else "rtn")
    try:
        qc = bq.QuantConfig(a.bits, 0 if a.group == -1 else a.group, a.sym, not a.no_clip, a.gptq, a.act_order)
        lc = bq.LearnConfig(a.init, a.steps, a.lr, a.rows, a.checkpoints, a.optim, a.lambda_unif, objective,
                            a.block_batch, a.block_tokens, a.lwc, a.clip_lr, refresh=a.refresh, block_input=a.block_input,
                            kl_quantizer=kl_quantizer)
    except ValueError as e:
        hint = f" (the default objective is {objective}: name another with --objective)" \
            if a.objective is None and a.kl_quantizer is None else ""
        raise UserError(f"{e}{hint}") from None
    if a.sweep and (a.finetune or a.finetune_from):
        raise UserError("--sweep runs its own end-to-end rows (-e2e); drop --finetune and --finetune_from")
    default_out = a.out is None
    if a.finetune_from is not None:
        if not os.path.isfile(a.finetune_from):
            raise UserError(f"--finetune_from {a.finetune_from}: no such file")
        given = [f"--{k}" for k in ("calib", "nsamples", "seqlen") if getattr(a, k) is not None]
        if given:
            raise UserError(f"--finetune_from uses the calibration tokens its file was made with: drop {', '.join(given)}")
        a.out = a.out or a.finetune_from.removesuffix(".safetensors") + \
            f"-e2e{pass_tag(cc)}.safetensors"
    if a.out is None:
        tag = (cc.rotation if cc.rotation != "butterfly" else f"bf-{lc.init}" + (
            "" if lc.objective == "layer" else f"-{lc.objective}") + (
            lc.kl_quantizer.replace("rtnclip", "clip") if (lc.objective == "kl" and lc.kl_quantizer != stand_in) or
            (lc.objective == "block" and lc.kl_quantizer != "rtn") else "") + (
            "-fpin" if lc.block_input == "fp" else "")) + (
            "-lwc" if lc.lwc else "")
        a.out = os.path.join("out", f"{os.path.basename(cc.ckpt.rstrip('/')).replace('.gguf', '')}-w{qc.bits}"
                                    f"g{qc.group}-{tag}-{'gptq' if qc.gptq else 'rtn'}"
                                    f"{'-u' + str(lc.lambda_unif) if lc.lambda_unif else ''}"
                                    f"{'-gptaq' + str(cc.gptaq) if cc.gptaq else ''}"
                                    f"{'-e2e' + pass_tag(cc) if cc.finetune else ''}.safetensors")
    inputs = [a.finetune_from, cc.ckpt, *calib_sources(cc.calib), os.path.join(SHARED_DATA, "wikitext103_valid.txt"),
              *(a.eval_data or [])]
    llama.check_output(a.out, inputs, suffix=".safetensors")
    if os.path.isfile(a.out):
        try:
            made = llama.read_safetensors(a.out, tensors=False)[0].get("settings", {})
        except UserError:
            raise UserError(f"--out {a.out} exists and is not a ButterflyQuant file: refusing to overwrite it") from None
        if default_out:     # the default name holds only some of the settings: never lose another run's file
            made = {k: v for k, v in made.items() if k not in FINGERPRINTS}
            want = json.loads(json.dumps(expected_settings(cc, qc, lc, a.finetune_from)))
            if made != want:
                raise UserError(f"{a.out} holds a calibration made with other settings ("
                                f"{', '.join(sorted(k for k in set(made) | set(want) if made.get(k) != want.get(k)))}"
                                f"): name another --out to keep it, or move it aside")
    if os.path.exists(a.out + ".partial") and not os.path.isdir(a.out + ".partial"):
        raise UserError(f"{a.out}.partial exists and is not a directory")
    eval_limit = a.eval_limit if a.eval_limit is not None else (None if on_gpu else 16)
    opts = dict(out=a.out, eval_data=a.eval_data, eval_limit=eval_limit or None, no_eval=a.no_eval, quiet=a.quiet,
                eval_seqlen=a.seqlen or 2048, report=REPORT_GPU if on_gpu else REPORT_CPU,
                sweep=a.sweep, sweep_only=[t for t in (a.sweep_only or "").split(",") if t], sweep_seeds=sweep_seeds,
                finetune_from=a.finetune_from)
    if a.sweep:
        sweep_rows(opts["sweep_only"], sweep_seeds)     # one clear line for a selection that matches nothing
    return cc, qc, lc, opts


def main(argv=None):
    cc, qc, lc, o = parse_args(sys.argv[1:] if argv is None else argv)
    evaluation.QUIET = o["quiet"]
    if not os.path.exists(cc.ckpt) and cc.ckpt not in llama.NAMED:
        llama.resolve_ckpt(cc.ckpt)     # one clear line for an unknown name
    if cc.ckpt.endswith(".safetensors"):
        raise UserError(f"{cc.ckpt} is a calibrated (already quantized) file: calibrate its full-precision checkpoint")
    for src in calib_sources(cc.calib) if cc.calib is not None else []:
        if not os.path.isfile(evaluation.resolve_data(src, "calib")[0]):
            raise UserError(f"calibration file not found: {src}")
    if o["sweep"]:
        files = o["eval_data"] if o["eval_data"] is not None else [
            os.path.join(SHARED_DATA, f) for f in ("wikitext2_test.txt", "c4_eval.jsonl")]
        return sweep(cc, qc, o["sweep_only"], files, o["eval_limit"], o["sweep_seeds"])
    found = evaluation.find_dataset("wikitext2", "eval")
    data = ([] if o["no_eval"] else [evaluation.resolve_data(d, "eval") for d in o["eval_data"]]
            if o["eval_data"] is not None else [found] if found else [])
    for path, _ in data:
        evaluation.read_corpus(path)        # fail now, not after calibrating
    if o["finetune_from"]:
        res = finetune_file(cc, o["finetune_from"], o["out"], [path for path, _ in data], o["eval_seqlen"])
    else:
        res = calibrate(cc, qc, lc, o["out"], [path for path, _ in data], o["eval_seqlen"])
    if o["no_eval"] or (o["eval_data"] is not None and not data):
        print(json.dumps(res))
        return res
    fp_model, _ = llama.load(cc.ckpt)
    qmodel, qtok = llama.load(o["out"])                 # the saved file, through the real loading path
    fp_model.to(cc.device)
    qmodel.to(cc.device)
    T = min(o["eval_seqlen"], fp_model.args.max_seq_len)      # 2048 (the protocol), or the model's context if shorter
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
