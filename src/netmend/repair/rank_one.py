"""Rank-one model editing (docs/methods/rectify-static.md): make a Linear/Conv2d map corrupted keys to cleansed values
while disturbing the stored key→value associations as little as possible.

    ΔW = Λ dᵀ,  d = C⁻¹ k*,  Λ = (v* − W k*) / (dᵀ k*)

C = E[k kᵀ] is the uncentred second moment of the layer's keys (streamed in float64, cached per
layer and invalidated when an upstream weight changes). For a conv every spatial position is a key
and the edit lives in input-channel space: ΔW[:, :, y, x] = Λ[:, y, x] dᵀ. Several pairs share
one direction by default; a value point after a nonlinearity is fitted by Adam on Λ.
"""
from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..defects.base import Defect, Pairs
from ..edit import Edit
from ..errors import NetmendError, require
from ..hooks import capture, execution_order, forward_hook, get_layer, weight_layers
from ..registry import REPAIRERS
from ..sites import Sites


# ----------------------------------------------------------------------------- keys and second moments

def check_editable(model: nn.Module, layer: str) -> nn.Module:
    """The named weight module, refusing what the rank-one rule does not cover (grouped convs, non-zero padding)."""
    mod = get_layer(model, layer)
    if isinstance(mod, nn.Conv2d):
        require(mod.groups == 1, f"layer {layer!r} is a grouped/depthwise conv (groups={mod.groups}); "
                                 "rank-one editing supports groups=1 only")
        require(mod.padding_mode == "zeros", f"layer {layer!r} uses padding_mode={mod.padding_mode!r}; only 'zeros' is supported")
        require(isinstance(mod.padding, tuple), f"layer {layer!r} uses padding={mod.padding!r}; give explicit padding")
    elif not isinstance(mod, nn.Linear):
        raise NetmendError(f"layer {layer!r} is a {type(mod).__name__}; rank-one editing needs a Linear or Conv2d "
                           f"(editable layers: {', '.join(weight_layers(model)[:12])})")
    return mod


def flat_keys(mod: nn.Module, k: torch.Tensor) -> torch.Tensor:
    """Layer input → one key per row: (N, n) for Linear (leading dims flattened), (N·H·W, C_in) for conv."""
    if isinstance(mod, nn.Conv2d):
        return k.permute(0, 2, 3, 1).reshape(-1, k.shape[1])
    return k.reshape(-1, k.shape[-1])


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i: i + batch_size]


def second_moment(model: nn.Module, layer: str, inputs: torch.Tensor, batch_size: int = 256,
                  device: str = "cpu") -> tuple[torch.Tensor, int]:
    """C = mean k kᵀ over every key the inputs produce at `layer` (float64, streamed: S += KᵀK)."""
    S, count = _key_sums(model, {layer: check_editable(model, layer)}, inputs, batch_size, device)
    require(count[layer] > 0, "no statistics inputs to estimate the key second moment")
    return S[layer] / count[layer], count[layer]


def _key_sums(model: nn.Module, mods: dict[str, nn.Module], inputs: torch.Tensor, batch_size: int,
              device: str) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
    """Σ k kᵀ (float64) and the number of keys at every layer of `mods`, from one forward pass per batch."""
    S: dict[str, torch.Tensor | None] = dict.fromkeys(mods)
    count = dict.fromkeys(mods, 0)
    model.eval()
    with torch.no_grad(), capture(model, list(mods)) as cap:
        for xb in _batches(inputs, batch_size):
            model(xb.to(device))
            for layer, mod in mods.items():
                K = flat_keys(mod, cap.inputs[layer]).double()
                S[layer] = K.T @ K if S[layer] is None else S[layer].addmm_(K.T, K)
                count[layer] += len(K)
    return S, count


_MOMENTS: dict[tuple, tuple] = {}


def _fingerprint(model: nn.Module, upstream: list[str]) -> tuple:
    """Identity + content of every parameter upstream of a layer: changes when an edit lands there, and comes
    back when it is reverted (dynamic rectification tries an edit, measures it and restores the exact weights;
    a version counter would call every later moment stale and recompute it)."""
    fp = []
    for name in upstream:
        for p in get_layer(model, name).parameters(recurse=False):
            fp.append((id(p), content_digest(p)))
    return tuple(fp)


def _upstream(model: nn.Module, layer: str, inputs: torch.Tensor) -> list[str]:
    order = execution_order(model, inputs)
    return order[: order.index(layer)] if layer in order else order


def cached_moment(model: nn.Module, layer: str, inputs: torch.Tensor, batch_size: int = 256,
                  device: str = "cpu") -> torch.Tensor:
    """`second_moment`, cached per (model, layer, inputs); recomputed lazily when an upstream weight changed.
    Inputs are keyed by content: callers build them afresh each time, and a freed tensor's id can come back."""
    key = (id(model), layer, content_digest(inputs))
    upstream = _upstream(model, layer, inputs)
    fp = _fingerprint(model, upstream)
    hit = _cached(key, model, fp)
    if hit is not None:
        return hit
    C, count = second_moment(model, layer, inputs, batch_size, device)
    _store_moment(key, model, fp, C, count, upstream)
    return C


def _cached(key: tuple, model: nn.Module, fp: tuple) -> torch.Tensor | None:
    """The cached C for key, if it was computed on this very model with these upstream weights."""
    hit = _MOMENTS.get(key)
    return hit[2] if hit is not None and hit[0]() is model and hit[1] == fp else None


def _store_moment(key: tuple, model: nn.Module, fp: tuple, C: torch.Tensor, count: int, upstream: list[str]) -> None:
    if len(_MOMENTS) > 32:
        _MOMENTS.clear()
    _MOMENTS[key] = (weakref.ref(model), fp, C, upstream)
    _prune(_COUNTS)
    _COUNTS[id(C)] = (weakref.ref(C), count)


def _prune(cache: dict) -> None:
    """Drop the entries whose tensor is gone (their factor would otherwise outlive it: a C is tens of MB)."""
    for k in [k for k, v in cache.items() if v[0]() is None]:
        del cache[k]


_COUNTS: dict[int, tuple] = {}


def moment_count(C: torch.Tensor) -> int | None:
    """How many keys the cached moment C was estimated from (None when C did not come from the cache)."""
    hit = _COUNTS.get(id(C))
    return hit[1] if hit is not None and hit[0]() is C else None


def prefetch_moments(model: nn.Module, layers: list[str], inputs: torch.Tensor, batch_size: int = 256,
                     device: str = "cpu") -> None:
    """Fill the moment cache for several layers with one forward pass over `inputs` (instead of one pass per
    layer): every layer's C is the very tensor `second_moment` computes (the same batches, the same sums)."""
    dig = content_digest(inputs)
    missing: dict[str, tuple] = {}
    for layer in dict.fromkeys(layers):
        try:
            mod = check_editable(model, layer)
        except NetmendError:
            continue                                     # cached_moment raises it where the layer is used
        key = (id(model), layer, dig)
        upstream = _upstream(model, layer, inputs)
        fp = _fingerprint(model, upstream)
        if _cached(key, model, fp) is None:
            missing[layer] = (mod, key, fp, upstream)
    if len(missing) < 2:                                 # nothing to share: cached_moment does it on demand
        return
    S, count = _key_sums(model, {layer: m[0] for layer, m in missing.items()}, inputs, batch_size, device)
    for layer, (_mod, key, fp, upstream) in missing.items():
        if count[layer] > 0:
            _store_moment(key, model, fp, S[layer] / count[layer], count[layer], upstream)


def share_moments(src: nn.Module, dst: nn.Module) -> int:
    """Make the moments cached for `src` valid for `dst`, a deep copy of it (`copy.deepcopy`: the same modules and
    buffers), where dst's upstream weights have the same bytes as those each moment was computed with. Returns
    how many were shared. Rectification works on a copy of the model it was given: without this, every moment
    the localiser computed is computed again."""
    n = 0
    for key, (ref, fp, C, upstream) in list(_MOMENTS.items()):
        if key[0] != id(src) or ref() is not src:
            continue
        try:
            fp_dst = _fingerprint(dst, upstream)
        except NetmendError:
            continue
        if [d for _i, d in fp_dst] != [d for _i, d in fp]:
            continue
        _MOMENTS[(id(dst), *key[1:])] = (weakref.ref(dst), fp_dst, C, upstream)
        n += 1
    return n


def content_digest(x: torch.Tensor) -> tuple:
    """Shape, dtype and a BLAKE2 digest of the bytes (about 10 ms for a few thousand images)."""
    data = x.detach().cpu().contiguous()
    return tuple(data.shape), str(data.dtype), hashlib.blake2b(data.view(torch.uint8).numpy(),   # no byte copy
                                                                digest_size=16).hexdigest()


def statistics_inputs(defect: Defect, include_val: bool = False, include_corrupted: bool = True) -> torch.Tensor:
    """The statistics set for C: the repair fit data plus the corrupted samples (Yang et al.'s Prop. 4.1)."""
    parts = [defect.repair.x_fit]
    if include_val:
        parts.append(defect.repair.x_val)
    if include_corrupted and defect.pairs is not None and len(defect.pairs):
        parts.append(defect.pairs.corrupted)
    return torch.cat(parts)


# ----------------------------------------------------------------------------- directions

def ridge(C: torch.Tensor, rho: float) -> float:
    """ε = ρ·tr(C)/n; a zero C means the layer never sees a nonzero key: nothing to edit."""
    tr = float(torch.trace(C))
    require(tr > 0 and torch.isfinite(C).all(), "key second moment is zero or not finite at this layer "
                                                "(its inputs are all zero on the repair data); choose another layer")
    return rho * tr / C.shape[0]


_FACTORS: dict[tuple, tuple] = {}


def _factor(C: torch.Tensor, rho: float) -> tuple[float, str, tuple]:
    """(ε, solver, factor) of C + εI, kept per C object and ρ: Cholesky L, or the ridge-clipped eigenpairs (w, V)
    where rounding made it indefinite. Every direction solved at a layer (the localiser's d and each edit tried
    there) uses the same factor, so it is computed once."""
    key = (id(C), float(rho))
    hit = _FACTORS.get(key)
    if hit is not None and hit[0]() is C:
        return hit[1]
    eps = ridge(C, rho)
    A = C.clone()
    A.diagonal().add_(eps)                               # C + εI (the same sums as C + ε·eye, without the eye)
    L, err = torch.linalg.cholesky_ex(A)
    if int(err) == 0:
        out = (eps, "cholesky", (L,))
    else:   # indefinite through rounding: clip the spectrum at the ridge
        w, V = torch.linalg.eigh(A)
        out = (eps, "eigh", (w.clamp_min(eps), V))
    _prune(_FACTORS)
    if len(_FACTORS) > 32:
        _FACTORS.clear()
    _FACTORS[key] = (weakref.ref(C), out)
    return out


def solve(C: torch.Tensor, rhs: torch.Tensor, rho: float = 1e-4) -> tuple[torch.Tensor, dict[str, Any]]:
    """(C + εI)⁻¹ rhs in float64 by Cholesky; fall back to an eigendecomposition (never an explicit inverse)."""
    C = C.double()
    rhs = rhs.double().to(C.device)
    vec = rhs.dim() == 1
    b = rhs[:, None] if vec else rhs
    eps, solver, f = _factor(C, rho)
    info: dict[str, Any] = {"rho": rho, "ridge": eps, "solver": solver}
    if solver == "cholesky":
        x = torch.cholesky_solve(b, f[0])
    else:
        w, V = f
        x = V @ ((V.T @ b) / w[:, None])
    return (x[:, 0] if vec else x), info


_EIGENVALUES: dict[int, tuple] = {}


EXACT_CONDITION_DIM = 1024   # above this width the condition number is estimated (an eigvalsh of a 3 136-wide C
                             # takes seconds on one thread; the estimate agrees with it to the digits it resolves)


def condition(C: torch.Tensor, eps: float) -> float:
    """Condition number of C + εI. The spectrum is kept per C object: every edit tried at a layer reports it,
    and the moment cache hands them the same C. Up to `EXACT_CONDITION_DIM` keys wide it is exact (eigvalsh);
    wider, λ_max is found by power iteration and λ_min is 0 when C comes from fewer keys than its width (it is
    singular: the ridge decides the condition), else by inverse iteration with the cached Cholesky factor."""
    hit = _EIGENVALUES.get(id(C))
    if hit is None or hit[0]() is not C:
        if len(_EIGENVALUES) > 32:
            _EIGENVALUES.clear()
        hit = (weakref.ref(C), _extreme_eigenvalues(C, eps))
        _EIGENVALUES[id(C)] = hit
    w = hit[1]
    return float((w[-1] + eps) / (w[0].clamp_min(0) + eps))


def _extreme_eigenvalues(C: torch.Tensor, eps: float, iters: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """(λ_min, λ_max) of C (the whole ascending spectrum when it is small enough to compute exactly)."""
    C = C.double()
    n = C.shape[0]
    if n <= EXACT_CONDITION_DIM:
        return torch.linalg.eigvalsh(C)

    def power(apply) -> float:
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(n, dtype=C.dtype, generator=g).to(C.device)
        v = v / v.norm()
        lam = 0.0
        for _ in range(iters):
            u = apply(v)
            new = float(v @ u)
            nu = u.norm()
            if not float(nu) > 0:
                return new
            v = u / nu
            if abs(new - lam) <= tol * abs(new):
                return new
            lam = new
        return lam

    top = power(lambda v: C @ v)
    count = moment_count(C)
    if count is not None and count < n:
        low = 0.0                                         # rank ≤ count < n: singular
    else:
        hit = next((h[1] for k, h in list(_FACTORS.items()) if k[0] == id(C) and h[0]() is C and h[1][0] == eps), None)
        e, solver, f = hit if hit is not None else _factor(C, float(eps) * n / max(float(torch.trace(C)), 1e-300))
        if solver == "cholesky":
            inv = power(lambda v: torch.cholesky_solve(v[:, None], f[0])[:, 0])
            low = max(1.0 / inv - e, 0.0) if inv > 0 else 0.0
        else:
            low = max(float(f[0][0]) - e, 0.0)
    return torch.tensor([low, top], dtype=torch.float64)


def shared_direction(C: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor | None = None,
                     rho: float = 1e-4, protect: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One edit direction for many keys: d = C^{-1/2}u, u the top left singular vector of the whitened
    keys. Computed without C^{-1/2} when keys are few: d = C⁻¹K a with a the top eigenvector of KᵀC⁻¹K.
    `protect` (keys whose values must not move, e.g. the cleansed twins) are projected out of the whitened
    keys first, so dᵀk = 0 for each of them: the minimal-disturbance edit under the extra constraints
    ΔW k_c = 0, still rank one because their residuals are zero."""
    K = keys.double().to(C.device).T                       # (n_dim, m)
    if weights is not None:
        K = K * weights.double().to(C.device).sqrt()[None, :]
    m = K.shape[1]
    P = protect.double().to(C.device).T if protect is not None and len(protect) else None
    if P is not None and m + P.shape[1] > K.shape[0] // 2:
        P = None                                           # too many to protect: they would span the key space
    if m == 1 and P is None:
        d, info = solve(C, K[:, 0], rho)
        return d, {**info, "protected": 0}
    if m + (0 if P is None else P.shape[1]) <= K.shape[0]:
        A = K if P is None else torch.cat([K, P], 1)
        D, info = solve(C, A, rho)                         # C⁻¹A; whitened inner products G = AᵀC⁻¹A
        G = A.T @ D
        G = (G + G.T) / 2
        coef = torch.eye(A.shape[1], m, dtype=G.dtype, device=G.device)
        if P is not None:                                  # remove the protected keys' whitened span
            Gpp, Gpk = G[m:, m:], G[m:, :m]
            Gpp = Gpp + 1e-10 * torch.trace(Gpp) / len(Gpp) * torch.eye(len(Gpp), dtype=G.dtype, device=G.device)
            coef[m:, :] = -torch.linalg.solve(Gpp, Gpk)
        H = coef.T @ G @ coef
        _, V = torch.linalg.eigh((H + H.T) / 2)
        d = D @ (coef @ V[:, -1])
    else:                                                  # many keys of few dims: whiten explicitly
        eps = ridge(C, rho)
        w, V = torch.linalg.eigh(C.double() + eps * torch.eye(C.shape[0], dtype=torch.float64, device=C.device))
        w = w.clamp_min(eps)
        Wm = V @ torch.diag(w.rsqrt()) @ V.T               # C^{-1/2}
        U, _, _ = torch.linalg.svd(Wm @ K, full_matrices=False)
        d = Wm @ U[:, 0]
        info = {"rho": rho, "ridge": eps, "solver": "eigh-whiten"}
    if float((d @ K).sum()) < 0:
        d = -d
    return d / d.norm(), {**info, "protected": 0 if P is None else int(P.shape[1])}


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


def _pairs(defect: Defect, n: int | None) -> Pairs:
    p = defect.require_pairs("rank-one editing")
    p = p if n is None else p.subset(int(n))
    shape = tuple(defect.repair.x_fit.shape[1:])
    if tuple(p.corrupted.shape[1:]) != shape:
        raise NetmendError(f"pairs have sample shape {tuple(p.corrupted.shape[1:])} but the model's inputs "
                           f"have shape {shape}")
    return p


def _key_mask(masks: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """Trigger masks (n, H, W) brought to a feature map's resolution (any touched cell counts)."""
    if masks is None:
        return None
    m = masks.float()[:, None]
    m = F.adaptive_max_pool2d(m, size) if m.shape[-2] >= size[0] else F.interpolate(m, size=size, mode="nearest")
    return m[:, 0]


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
        wts = _key_mask(vmask, tuple(v_target.shape[-2:])).to(v_target)[:, None].sqrt()
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
    pairs = _pairs(defect, cfg.pairs)
    model.eval()
    xb, xc = pairs.corrupted.to(device), pairs.clean.to(device)
    k_bad, _, v_bad = _layer_io(model, layer, value, xb, device)
    k_cln, _, v_cln = _layer_io(model, layer, value, xc, device)
    W = mod.weight.detach()
    C = cached_moment(model, layer, statistics_inputs(defect, cfg.stats_include_val), cfg.batch_size, device)
    is_conv = isinstance(mod, nn.Conv2d)
    # keys for the direction: every position, or only those the trigger touches
    keys, kw, sel = flat_keys(mod, k_bad), None, None
    kmask = _key_mask(pairs.masks, tuple(k_bad.shape[-2:])) if (is_conv and pairs.masks is not None) else None
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
                    config=RankOneConfig)
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
