"""Rank-one model editing (docs/methods/rectify-static.md): make a Linear/Conv2d map corrupted keys to cleansed values
while disturbing the stored key→value associations as little as possible.

    ΔW = Λ dᵀ,  d = C⁻¹ k*,  Λ = (v* − W k*) / (dᵀ k*)

C = E[k kᵀ] is the uncentred second moment of the layer's keys (netmend/editing.py: streamed in float64,
cached per layer and invalidated when an upstream weight changes). For a conv every spatial position is a key
and the edit lives in input-channel space: ΔW[:, :, y, x] = Λ[:, y, x] dᵀ. Several pairs share
one direction by default; a value point after a nonlinearity is fitted by Adam on Λ.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..defects.base import Defect
from ..edit import Edit
from ..editing import (cached_moment, check_editable, condition, flat_keys, key_mask, select_pairs, shared_direction,
                       solve, statistics_inputs)
from ..errors import require
from ..hooks import capture, forward_hook, get_layer
from ..registry import REPAIRERS
from ..sites import Sites


# ----------------------------------------------------------------------------- the edit

@dataclass
class RankOneConfig:
    layer: str | None = None          # weight module (dotted name); default: top site, else the last feature layer
    value: str | None = None          # value point (a module whose output is matched); default: the weight module
    pairs: int | None = None          # use the first n of the defect's pairs (None = all)
    mode: str = "shared"              # shared (one direction, Λ on all pairs) | rank-r (Linear only)
    mask_keys: bool = True            # conv: direction from keys at trigger-mask positions only (all if no mask)
    protect_clean: bool = True        # keep the cleansed twins' values: dᵀk_c = 0 (still rank one; see shared_direction)
    mask_values: bool = False         # conv: fit Λ only at output positions whose receptive field meets the mask
    rho: float = 1e-4                 # ridge ε = ρ·tr(C)/n
    mu: float = 1e-6                  # relative ridge on the Λ least-squares system
    clamp: float = 1.0                # κ: ‖ΔW‖_F ≤ κ‖W‖_F
    steps: int = 300                  # T: Adam steps when the value point is after a nonlinearity
    lr: float = 1e-2
    tol: float = 1e-4                 # stop when the relative loss change over `patience` steps is below this
    patience: int = 30
    stats_include_val: bool = False   # statistics set for C: fit split + corrupted samples (+ val if set)
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"


def _layer_io(model: nn.Module, layer: str, value: str, x: torch.Tensor, device: str):
    with torch.no_grad(), capture(model, sorted({layer, value})) as cap:
        model(x.to(device))
    return cap.inputs[layer], cap.outputs[layer], cap.outputs[value]


def _pre(mod: nn.Module, k: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The layer's linear map without bias."""
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(k, W, None, mod.stride, mod.padding, mod.dilation)
    return k @ W.T


def _lambda_closed(mod: nn.Module, d: torch.Tensor, k_bad: torch.Tensor, target: torch.Tensor,
                   W: torch.Tensor, pos_mask: torch.Tensor | None, mu: float) -> torch.Tensor:
    """Least-squares Λ for ΔW = Λ⊗d so that (W + ΔW) k* ≈ target (pre-activation, no bias)."""
    R = (target - _pre(mod, k_bad, W)).double()
    if isinstance(mod, nn.Conv2d):
        s = torch.einsum("c,nchw->nhw", d, k_bad.double())[:, None]
        kh, kw = mod.kernel_size
        Z = F.unfold(s, (kh, kw), dilation=mod.dilation, padding=mod.padding, stride=mod.stride)   # (n, kh·kw, L)
        Rm = R.flatten(2)                                                                            # (n, o, L)
        if pos_mask is not None:
            w = pos_mask.flatten(1).double()[:, None]                                                # (n, 1, L)
            Z, Rm = Z * w, Rm * w
        ZZ = torch.einsum("npl,nql->pq", Z, Z)
        RZ = torch.einsum("nol,npl->op", Rm, Z)
        lam = torch.linalg.solve(ZZ + mu * (torch.trace(ZZ) / len(ZZ) + 1e-30) * torch.eye(len(ZZ), dtype=ZZ.dtype, device=ZZ.device), RZ.T).T
        return lam.reshape(W.shape[0], kh, kw)
    s = flat_keys(mod, k_bad).double() @ d                                                           # (N,)
    Rf = R.reshape(-1, R.shape[-1])
    return (Rf.T @ s) / (s @ s + mu * (s @ s) + 1e-30)


def _delta(mod: nn.Module, lam: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        return torch.einsum("oyx,c->ocyx", lam, d)
    return torch.outer(lam, d)


def _fit_lambda(model: nn.Module, layer: str, value: str, mod: nn.Module, d: torch.Tensor, lam0: torch.Tensor,
                x_bad: torch.Tensor, v_target: torch.Tensor, vmask: torch.Tensor | None, cfg: RankOneConfig):
    """Projected fit: Adam on Λ with W' = W₀ + Λ⊗d, the whole model run by functional_call and the
    value point read by a hook. ΔW stays in span(d) by construction."""
    wname = f"{layer}.weight"
    W0 = mod.weight.detach()
    d32 = d.to(W0.dtype)
    lam = lam0.to(W0.dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=cfg.lr)
    out: dict[str, torch.Tensor] = {}
    wts = None
    if vmask is not None and v_target.dim() == 4:
        wts = key_mask(vmask, tuple(v_target.shape[-2:])).to(v_target)[:, None].sqrt()
    losses = []
    with forward_hook(get_layer(model, value), lambda _m, _i, o: out.__setitem__("v", o)):
        for step in range(cfg.steps):
            W = W0 + _delta(mod, lam, d32)
            functional_call(model, {wname: W}, (x_bad,))
            diff = out["v"] - v_target
            if wts is not None:
                diff = diff * wts
            loss = diff.abs().sum() / len(x_bad)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step >= cfg.patience and abs(losses[-cfg.patience] - losses[-1]) <= cfg.tol * abs(losses[-cfg.patience]):
                break
    return lam.detach().double(), {"fit_steps": len(losses), "fit_loss_first": losses[0] if losses else None,
                                   "fit_loss_last": losses[-1] if losses else None}


def rank_one_edit(model: nn.Module, defect: Defect, layer: str, cfg: RankOneConfig | None = None,
                  value: str | None = None) -> Edit:
    """One rank-one edit of `layer` mapping the pairs' corrupted keys to their cleansed values."""
    cfg = cfg or RankOneConfig()
    t0 = time.perf_counter()
    device = cfg.device
    mod = check_editable(model, layer)
    value = value or cfg.value or layer
    get_layer(model, value)
    pairs = select_pairs(defect, cfg.pairs)
    model.eval()
    xb, xc = pairs.corrupted.to(device), pairs.clean.to(device)
    k_bad, _, v_bad = _layer_io(model, layer, value, xb, device)
    k_cln, _, v_cln = _layer_io(model, layer, value, xc, device)
    W = mod.weight.detach()
    C = cached_moment(model, layer, statistics_inputs(defect, cfg.stats_include_val), cfg.batch_size, device)
    is_conv = isinstance(mod, nn.Conv2d)
    # keys for the direction: every position, or only those the trigger touches
    keys, kw, sel = flat_keys(mod, k_bad), None, None
    kmask = key_mask(pairs.masks, tuple(k_bad.shape[-2:])) if (is_conv and pairs.masks is not None) else None
    if is_conv and cfg.mask_keys and kmask is not None and kmask.sum() > 0:
        sel = kmask.to(device).reshape(-1) > 0
        keys, kw = keys[sel], kmask.to(device).reshape(-1)[sel]
    if cfg.mode == "rank-r":
        return _rank_r_edit(mod, layer, value, C, k_bad, k_cln, W, cfg, t0, len(pairs))
    require(cfg.mode == "shared", f"unknown rank-one mode {cfg.mode!r}; use 'shared' or 'rank-r'")
    protect = None
    if cfg.protect_clean:
        ckeys = flat_keys(mod, k_cln)
        protect = ckeys[sel] if (kw is not None) else ckeys
    if not is_conv and len(pairs) == 1 and protect is None:
        d, sinfo = solve(C, keys[0], cfg.rho)
        sinfo["protected"] = 0
    else:
        d, sinfo = shared_direction(C, keys, kw, cfg.rho, protect)
    # value targets at the weight module's own output: the cleansed pre-activation, or (when the value point is
    # downstream and additive in the weight output) pre(x̃) + v(x) − v(x̃) — exact for a residual block output
    target_pre = _pre(mod, k_cln, W)
    if value != layer:
        pre_bad = _pre(mod, k_bad, W)
        target_pre = pre_bad + (v_cln - v_bad) if v_cln.shape == pre_bad.shape else pre_bad
    pos_mask = None
    if is_conv and cfg.mask_values and pairs.masks is not None:
        m_in = F.interpolate(pairs.masks.float()[:, None], size=tuple(k_bad.shape[-2:]), mode="nearest")
        kh, kw_ = mod.kernel_size
        pos_mask = (F.unfold(m_in, (kh, kw_), dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                    .amax(1).reshape(target_pre.shape[0], *target_pre.shape[-2:]) > 0).to(device)
    lam = _lambda_closed(mod, d, k_bad, target_pre, W, pos_mask, cfg.mu)
    fit_info: dict[str, Any] = {}
    if value != layer:
        lam, fit_info = _fit_lambda(model, layer, value, mod, d, lam, xb, v_cln, pairs.masks, cfg)
    dW = _delta(mod, lam, d)
    rel = float(dW.norm() / W.double().norm())
    clamped = rel > cfg.clamp
    if clamped:
        dW = dW * (cfg.clamp / rel)
        lam = lam * (cfg.clamp / rel)
    meta = {"repairer": "rank-one", "layer": layer, "value": value, "mode": cfg.mode, "pairs": len(pairs),
            "lambda": lam.float().flatten().tolist(), "d": d.float().tolist(), "relative_norm": min(rel, cfg.clamp),
            "unclamped_relative_norm": rel, "clamped": clamped, "condition": condition(C, sinfo["ridge"]),
            "direction_keys": int(len(keys)), **sinfo, **fit_info, "seconds": time.perf_counter() - t0}
    return Edit({f"{layer}.weight": dW.to(W.dtype).cpu()}, meta)


def _rank_r_edit(mod, layer, value, C, k_bad, k_cln, W, cfg, t0, n_pairs) -> Edit:
    """Hard rank-r edit: ΔW = (V* − W K*)(DᵀK* + μI)⁻¹ Dᵀ, D = C⁻¹K*. Linear value points only."""
    require(isinstance(mod, nn.Linear) and value == layer, "mode 'rank-r' supports a Linear layer edited at its own output")
    K = flat_keys(mod, k_bad).double().T
    R = (flat_keys(mod, k_cln).double() - K.T) @ W.double().T                    # (r, m): W(k_c − k̃)
    D, sinfo = solve(C, K, cfg.rho)
    G = D.T @ K
    G = G + cfg.mu * torch.trace(G) / len(G) * torch.eye(len(G), dtype=G.dtype, device=G.device)
    dW = torch.linalg.solve(G, R).T @ D.T                                          # R.T G⁻¹ Dᵀ (G symmetric)
    rel = float(dW.norm() / W.double().norm())
    clamped = rel > cfg.clamp
    if clamped:
        dW = dW * (cfg.clamp / rel)
    meta = {"repairer": "rank-one", "layer": layer, "value": value, "mode": "rank-r", "pairs": n_pairs,
            "rank": int(K.shape[1]), "relative_norm": min(rel, cfg.clamp), "unclamped_relative_norm": rel,
            "clamped": clamped, **sinfo, "seconds": time.perf_counter() - t0}
    return Edit({f"{layer}.weight": dW.to(W.dtype).cpu()}, meta)


@REPAIRERS.register("rank-one", "one rank-one edit (closed form / projected fit) at the top site or a named layer",
                    config=RankOneConfig, needs=("pairs",))
def repair_rank_one(model: nn.Module, defect: Defect, sites: Sites | None, cfg: RankOneConfig) -> Edit:
    layer, value = cfg.layer, cfg.value
    if layer is None and sites is not None and len(sites):
        layer = sites[0].layer
        value = value or sites[0].info.get("value_point")
    if layer is None:                       # the static site: the last feature layer (Santurkar's default)
        from ..locate.attribution import static_site

        site = static_site(model)
        layer, value = site.weight, value or site.value
    edit = rank_one_edit(model, defect, layer, cfg, value)
    edit.meta["layers"] = [layer]
    return edit
