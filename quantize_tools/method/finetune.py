"""Block fine-tuning (beyond the paper, after its §1-§2 per layer): with a layer's codes fixed, tune its continuous tensors to the FP block's output.

Once the codes are chosen, every float a KBVQ layer stores -- each matrix's codebook, the private
factors ``A_i``, the shared bases ``B`` and the BCOS ``s, b`` of every routed and shared matrix -- is a
continuous parameter of the quantized MoE block. Adam lowers the squared error between the quantized
block's output and the FP block's on the calibration tokens (AQLM tunes its codebooks layer by layer
the same way). The block's own forward runs around the experts, so its router and shared-expert gate
route the tokens as in the FP model, and the down projections are tuned on what the tuned gate and
up produce. The tuned values are stored where the untuned ones were: format and bits are unchanged.

Step sizes are relative: each tensor moves by about ``lr`` times its initial RMS per step (``b``: times
its matrix's output RMS; ``s``, already relative, by ``lr``), so one setting fits codebooks, factors
and biases of any scale. A tenth of the tokens is held out: a layer whose held-out error did not
drop keeps its untuned values, so tuning cannot make a layer worse on data it was not fitted to.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from vllm_kbvq.archs import WEIGHT_TYPES, MoEGeometry
from vllm_kbvq.packing import pack_codes, unpack_codes

from .experts import DenseExperts, TunableExperts, TunableLinear
from .vq import assign_torch, to_vectors

__all__ = ["finetune_block", "block_error"]

_CHUNK = 4096  # tokens per forward when evaluating
_HOLDOUT = 0.1  # share of the calibration tokens kept out of the fitting
_FINAL_LR = 0.1  # the cosine schedule ends at this fraction of the learning rate
_PROBE = 4096  # fitted tokens the reported "fit" error is measured on


def _block_out(block, x: torch.Tensor) -> torch.Tensor:
    return block(x[None])[0]


def block_error(block, x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor | None = None) -> float:
    """``sum |block(x) - target|^2 / sum |target|^2`` over the tokens ``x`` ``[T, hidden]`` (those ``idx`` picks)."""
    idx = torch.arange(x.shape[0], device=x.device) if idx is None else idx
    err = energy = 0.0
    with torch.no_grad():
        for i in range(0, idx.numel(), _CHUNK):
            rows = idx[i:i + _CHUNK]
            y, t = _block_out(block, x[rows]), target[rows]
            err += float((y - t).double().pow(2).sum())
            energy += float(t.double().pow(2).sum())
    return err / max(energy, 1e-30)


def _mean_square(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx].pow(2).mean()`` without the copy of ``t[idx]`` (calibration sets of real models are GBs)."""
    total = sum(t[idx[i:i + _CHUNK]].double().pow(2).sum() for i in range(0, idx.numel(), _CHUNK))
    return (total / (idx.numel() * t.shape[1])).to(t.dtype)


def _tunable_group(res, device) -> tuple[list[TunableLinear], nn.Parameter | None]:
    """A GroupResult's members as trainable matrices sharing one basis parameter."""
    basis = None if res.lr_b is None else nn.Parameter(res.lr_b.to(device, torch.float32).clone())
    n = len(res.vq_codes)
    linears = [TunableLinear(unpack_codes(res.vq_codes[e], res.widths[e].index_bits,
                                          res.ic // res.widths[e].vector_dim).to(device),
                             res.vq_codebook[e].to(device), None if res.lr_a is None else res.lr_a[e].to(device),
                             basis, res.affine_s[e].to(device), res.affine_b[e].to(device))
               for e in range(n)]
    return linears, basis


def _store(res, linears: list[TunableLinear], basis: nn.Parameter | None) -> None:
    """Write the tuned values back into the GroupResult, in the format's dtypes."""
    half = lambda ts: torch.stack([t.detach().to("cpu", torch.float16) for t in ts])  # noqa: E731
    res.vq_codebook = [m.codebook.detach().to("cpu", torch.float16) for m in linears]
    res.affine_s = half(m.affine_s for m in linears)
    res.affine_b = half(m.affine_b for m in linears)
    if basis is not None:
        res.lr_a = half(m.lr_a for m in linears)
        res.lr_b = basis.detach().to("cpu", torch.float16)
    res.vq_codes = [pack_codes(m.codes.cpu(), w.index_bits) for m, w in zip(linears, res.widths)]


def _reassign(linears: list[TunableLinear], w_fp: torch.Tensor) -> None:
    """Each vector to the tuned codeword nearest to what the tuned low-rank part and affine leave of the
    FP weight, ``W / (1 + s) - A B`` (the code's share of the matrix)."""
    with torch.no_grad():
        for e, m in enumerate(linears):
            w = w_fp[e].to(m.codebook.device, torch.float32)
            target = w / (1 + m.affine_s)[:, None]
            if m.lr_a is not None:
                target = target - m.lr_a @ m.basis
            d = m.codebook.shape[1]
            m.codes.copy_(assign_torch(to_vectors(target, d)[None], m.codebook[None])[0].reshape(m.codes.shape))


def finetune_block(block, geom: MoEGeometry, x: torch.Tensor, results: dict, weights: Callable,
                   act_fn, opts, seed: int, device="cpu",
                   progress: Callable[[str], None] | None = None) -> dict:
    """Tune the ``results`` (``(group, wtype) -> GroupResult``, changed in place) of one MoE ``block``.

    ``block`` is the transformers MoE block with its FP router and shared expert; its experts module
    is swapped during the call and put back after. ``x`` ``[T, hidden]``: the tokens entering the block
    (they came through the quantized earlier layers). Returns the report: errors before and after on
    the fitted and the held-out tokens, steps, seconds, and whether the tuned values were kept.
    """
    say = progress or (lambda msg: None)
    t0 = time.time()
    x = x.to(device, torch.float32)
    arch, n_experts = geom.arch, geom.n_experts
    shared_mlp = getattr(block, arch.shared_attr) if ("shared_experts", "gate") in results else None
    shared_names = {w: arch.shared_proj_names[w] for w in WEIGHT_TYPES}
    old_experts = getattr(block, arch.experts_attr)
    old_shared = {w: getattr(shared_mlp, n) for w, n in shared_names.items()} if shared_mlp is not None else {}
    grad_flags = [(p, p.requires_grad) for p in block.parameters()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        say("fine-tuning: FP block outputs")
        dense = DenseExperts(geom, act_fn, device=device)
        with torch.no_grad():
            for wtype in WEIGHT_TYPES:
                w = weights("experts", wtype)
                for e in range(n_experts):
                    dense[e].proj(wtype).weight.copy_(w[e])
        setattr(block, arch.experts_attr, dense)
        with torch.no_grad():
            target = torch.cat([_block_out(block, x[i:i + _CHUNK]) for i in range(0, x.shape[0], _CHUNK)])
        del dense

        groups = {key: _tunable_group(res, device) for key, res in results.items()}
        setattr(block, arch.experts_attr,
                TunableExperts(arch, {w: groups["experts", w][0] for w in WEIGHT_TYPES}, act_fn))
        if shared_mlp is not None:
            for w, name in shared_names.items():
                setattr(shared_mlp, name, groups["shared_experts", w][0][0])

        perm = torch.randperm(x.shape[0], generator=gen).to(device)
        n_hold = int(x.shape[0] * _HOLDOUT) if x.shape[0] >= 20 else 0
        hold, fit = perm[:n_hold], perm[n_hold:]
        probe = fit[:_PROBE]  # fit is in random order: a sample of the fitted tokens, for the report
        judge, judged = ("held_out", hold) if n_hold else ("fit", probe)  # what decides which values are kept
        before = {"fit": block_error(block, x, target, probe)}
        if n_hold:
            before["held_out"] = block_error(block, x, target, hold)
        opt = torch.optim.Adam(_param_groups(block, groups, x[fit[:_CHUNK]], opts.finetune_lr), betas=(0.9, 0.95))
        steps, batch = opts.finetune_steps, min(opts.finetune_batch, fit.numel())
        energy = _mean_square(target, fit)
        order, pos = fit[torch.randperm(fit.numel(), generator=gen).to(device)], 0
        with torch.enable_grad():
            for step in range(steps):
                if pos + batch > order.numel():  # a new epoch, reshuffled
                    order, pos = fit[torch.randperm(fit.numel(), generator=gen).to(device)], 0
                idx = order[pos:pos + batch]
                pos += batch
                scale = _FINAL_LR + (1 - _FINAL_LR) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * scale
                loss = (_block_out(block, x[idx]) - target[idx]).pow(2).mean() / energy
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % 10 == 0 or step == steps - 1:
                    say(f"fine-tuning step {step + 1}/{steps}, loss {loss.item():.4g}")
        after = {"fit": block_error(block, x, target, probe)}
        if n_hold:
            after["held_out"] = block_error(block, x, target, hold)
        rep = {"steps": steps, "batch": batch, "lr": opts.finetune_lr, "fit_tokens": int(fit.numel()),
               "held_out_tokens": n_hold, "probe_tokens": int(probe.numel()), "rel_err_before": before,
               "rel_err_after": after}
        if opts.finetune_reassign:
            say("fine-tuning: re-assigning codes")
            saved = {key: [m.codes.clone() for m in lin] for key, (lin, _) in groups.items()}
            for (group, wtype), (lin, _) in groups.items():
                _reassign(lin, weights(group, wtype))
            reassigned = block_error(block, x, target, judged)
            rep["rel_err_reassigned"] = reassigned
            rep["reassign_kept"] = reassigned < after[judge]
            if not rep["reassign_kept"]:
                for key, (lin, _) in groups.items():
                    for m, c in zip(lin, saved[key]):
                        m.codes.copy_(c)
        rep["kept"] = after[judge] < before[judge]
        if rep["kept"]:
            for k, (lin, basis) in groups.items():
                _store(results[k], lin, basis)
    finally:
        setattr(block, arch.experts_attr, old_experts)
        for w, mod in old_shared.items():
            setattr(shared_mlp, shared_names[w], mod)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    rep["seconds"] = round(time.time() - t0, 2)
    return rep


def _param_groups(block, groups: dict, x_sample: torch.Tensor, lr: float) -> list[dict]:
    """One Adam group per tensor kind and matrix, with its step size relative to the tensor's scale."""
    out_rms: dict[int, float] = {}
    hooks = []
    for lin, _ in groups.values():
        for m in lin:
            def hook(mod, inp, out):
                out_rms[id(mod)] = float(out.detach().pow(2).mean().sqrt()) if out.numel() else 0.0
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        _block_out(block, x_sample)
    for h in hooks:
        h.remove()
    seen = [v for v in out_rms.values() if v > 0]
    typical = sum(seen) / len(seen) if seen else 1.0  # for a matrix the sample routed no token to

    def rms(t: torch.Tensor) -> float:
        return float(t.detach().pow(2).mean().sqrt())

    param_groups = []

    def add(p, scale):
        if p is not None:
            base = lr * (scale if scale > 0 and math.isfinite(scale) else 1.0)
            param_groups.append({"params": [p], "lr": base, "base_lr": base})

    for lin, basis in groups.values():
        add(basis, rms(basis) if basis is not None else 0.0)
        for m in lin:
            add(m.codebook, rms(m.codebook))
            add(m.lr_a, rms(m.lr_a) if m.lr_a is not None else 0.0)
            add(m.affine_s, 1.0)
            add(m.affine_b, out_rms.get(id(m)) or typical)
    return param_groups
