"""The editing maths shared by localisers and repairers: keys, their second moments, solves and directions.

A layer's *keys* are its inputs (one row per sample for a Linear, one per spatial position for a conv); the rank-one
edit and the editability score both need C = E[k kᵀ], the uncentred second moment of the keys on clean data, and
solves against it. C is streamed in float64 and cached per layer, invalidated when an upstream weight changes, so
that localisation and repair (and every round of a dynamic repair) share one pass over the statistics data.
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .defects.base import Defect, Pairs
from .errors import NetmendError, require
from .hooks import capture, execution_order, get_layer, weight_layers
from .layout import fast_layout

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
    """C = mean k kᵀ over every key the inputs produce at `layer` (float64, streamed: S += KᵀK), as a tensor."""
    C, count = _moment(model, layer, inputs, batch_size, device)
    return dense(C), count


def _moment(model: nn.Module, layer: str, inputs: torch.Tensor, batch_size: int, device: str
            ) -> tuple[Moment, int]:
    S, count, keys, _raw = _key_sums(model, {layer: check_editable(model, layer)}, inputs, batch_size, device)
    require(count[layer] > 0, "no statistics inputs to estimate the key second moment")
    return _as_moment(S[layer], count[layer], keys.get(layer)), count[layer]


def _as_moment(S: torch.Tensor | None, count: int, keys: torch.Tensor | None) -> Moment:
    return KeyMoment(keys) if S is None else S / count


def _key_sums(model: nn.Module, mods: dict[str, nn.Module], inputs: torch.Tensor, batch_size: int,
              device: str, keep_inputs: int = 0
              ) -> tuple[dict[str, torch.Tensor | None], dict[str, int], dict[str, torch.Tensor | None],
                         dict[str, torch.Tensor]]:
    """Per layer of `mods`, from one forward pass per batch: Σ k kᵀ (float64) and the number of keys — or, where the
    statistics set gives fewer keys than the key width (`keys_suffice`), the keys themselves (float64, one per row)
    and no sum: C is then held as its keys (`KeyMoment`). With `keep_inputs` (bytes), also each layer's inputs as
    the model computed them, for as many layers as fit in that budget (the deepest first): a later pass over the
    same samples reads them instead of running the model up to the layer."""
    S: dict[str, torch.Tensor | None] = dict.fromkeys(mods)
    count = dict.fromkeys(mods, 0)
    kept: dict[str, list[torch.Tensor]] = {}
    raw: dict[str, list[torch.Tensor]] = {}
    model.eval()
    with torch.no_grad(), capture(model, list(mods)) as cap, fast_layout(model, inputs[:2], len(inputs)):
        for xb in _batches(inputs, batch_size):
            model(xb.to(device))
            if keep_inputs and not raw and len(inputs):
                raw = {layer: [] for layer in _within_budget(cap.inputs, list(mods), len(inputs) / len(xb),
                                                             keep_inputs)}
            for layer in raw:
                raw[layer].append(cap.inputs[layer].detach().clone())
            for layer, mod in mods.items():
                K = flat_keys(mod, cap.inputs[layer]).double()
                if S[layer] is None and layer not in kept:            # first batch: sums or the keys themselves
                    if keys_suffice(len(K) * len(inputs) / len(xb), K.shape[1]):
                        kept[layer] = []
                    else:
                        S[layer] = torch.zeros(K.shape[1], K.shape[1], dtype=K.dtype, device=K.device)
                if layer in kept:
                    kept[layer].append(K if K.dtype != cap.inputs[layer].dtype else K.clone())
                else:
                    _add_gram(S[layer], K)
                count[layer] += len(K)
    keys = {layer: torch.cat(k) if k else None for layer, k in kept.items()}
    S = {layer: None if m is None else _mirrored(m) for layer, m in S.items()}
    return S, count, keys, {layer: torch.cat(v) for layer, v in raw.items() if v}


def keys_suffice(count: float, width: int) -> bool:
    """Hold C as its keys when there are fewer of them than the key width: C is then singular (rank ≤ count), and
    both its forming (count·width² against count²·width) and the factor of C + εI (width³ against count³, through
    `_woodbury_factor`) cost less from the count × count Gram matrix of the keys."""
    return count < width


class KeyMoment:
    """C = XᵀX / N held as its N keys X (one per row, float64), N below the width: the width × width matrix is only
    formed when a caller asks for it (`dense`); solves go through the N × N Gram matrix of X (`_woodbury_factor`).
    On a fully connected layer after a large feature map (Fashion-MNIST's fc1: 2 401 keys of width 3 136) that skips
    the costliest products of a rank-one edit."""

    def __init__(self, keys: torch.Tensor):
        self.X = keys
        self.count = len(keys)
        self._dense: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.X.shape[1], self.X.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    @property
    def device(self) -> torch.device:
        return self.X.device

    def double(self) -> "KeyMoment":
        return self

    def trace(self) -> float:
        return float((self.X * self.X).sum()) / self.count

    def finite(self) -> bool:
        return bool(torch.isfinite(self.X).all())

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            S = torch.zeros(self.shape, dtype=self.X.dtype, device=self.X.device)
            _add_gram(S, self.X)
            self._dense = _mirrored(S) / self.count
        return self._dense


Moment = torch.Tensor | KeyMoment


def dense(C: Moment) -> torch.Tensor:
    """C as a width × width tensor (a `KeyMoment` forms it once)."""
    return C.dense() if isinstance(C, KeyMoment) else C


def _within_budget(first: dict[str, torch.Tensor], layers: list[str], batches: float, budget: int) -> list[str]:
    """The layers whose inputs over all the batches fit in `budget` bytes together, deepest (last) first."""
    chosen, used = [], 0.0
    for layer in reversed(layers):
        size = first[layer].element_size() * first[layer].numel() * batches
        if used + size <= budget:
            chosen.append(layer)
            used += size
    return chosen


GRAM_BLOCKED = 512       # from this width on, Σ KᵀK is accumulated in row strips over the upper triangle only


def _mirrored(S: torch.Tensor) -> torch.Tensor:
    """The symmetric Σ kkᵀ from what `_add_gram` filled: from `GRAM_BLOCKED` keys wide, its upper triangle only."""
    return torch.triu(S) + torch.triu(S, 1).T if S.shape[0] >= GRAM_BLOCKED else S


def _add_gram(S: torch.Tensor, K: torch.Tensor, strips: int = 4) -> None:
    """S += KᵀK; from `GRAM_BLOCKED` keys wide, only the upper triangle, strip by strip (a 3 136-wide Gram of 256
    keys: 0.69 s against 1.10 s for the full product, 10 batches on one thread), mirrored once at the end
    (`_mirrored`)."""
    d = K.shape[1]
    if d < GRAM_BLOCKED:
        S.addmm_(K.T, K)
        return
    edges = [round(i * d / strips) for i in range(strips + 1)]
    for a, b in zip(edges, edges[1:]):
        S[a:b, a:].addmm_(K[:, a:b].T, K[:, a:])


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
                  device: str = "cpu") -> Moment:
    """`second_moment`, cached per (model, layer, inputs); recomputed lazily when an upstream weight changed (held
    as its keys where they are fewer than the width: `KeyMoment`).
    Inputs are keyed by content: callers build them afresh each time, and a freed tensor's id can come back."""
    key = (id(model), layer, content_digest(inputs))
    upstream = _upstream(model, layer, inputs)
    fp = _fingerprint(model, upstream)
    hit = _cached(key, model, fp)
    if hit is not None:
        return hit
    C, count = _moment(model, layer, inputs, batch_size, device)
    _store_moment(key, model, fp, C, count, upstream)
    return C


def _cached(key: tuple, model: nn.Module, fp: tuple) -> Moment | None:
    """The cached C for key, if it was computed on this very model with these upstream weights."""
    hit = _MOMENTS.get(key)
    return hit[2] if hit is not None and hit[0]() is model and hit[1] == fp else None


def _store_moment(key: tuple, model: nn.Module, fp: tuple, C: Moment, count: int, upstream: list[str],
                  layer_inputs: torch.Tensor | None = None) -> None:
    if len(_MOMENTS) > 32:
        _MOMENTS.clear()
    _MOMENTS[key] = (weakref.ref(model), fp, C, upstream)
    _prune(_COUNTS)
    _COUNTS[id(C)] = (weakref.ref(C), count, layer_inputs)


def _prune(cache: dict) -> None:
    """Drop the entries whose tensor is gone (their factor would otherwise outlive it: a C is tens of MB)."""
    for k in [k for k, v in cache.items() if v[0]() is None]:
        del cache[k]


_COUNTS: dict[int, tuple] = {}


def moment_count(C: Moment) -> int | None:
    """How many keys the cached moment C was estimated from (None when C did not come from the cache)."""
    if isinstance(C, KeyMoment):
        return C.count
    hit = _COUNTS.get(id(C))
    return hit[1] if hit is not None and hit[0]() is C else None


def moment_keys(C: Moment) -> torch.Tensor | None:
    """The keys (one per row, float64) a moment held as its keys (`KeyMoment`) was estimated from; else None."""
    return C.X if isinstance(C, KeyMoment) else None


INPUTS_BUDGET = 256 * 2**20   # bytes of layer inputs `prefetch_moments` keeps for later passes over the same samples


def cached_layer_inputs(model: nn.Module, layers: list[str], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer of `layers`: its inputs for every sample of `inputs` (one row each, in order), as the statistics
    pass of `prefetch_moments` computed them on this model with its current upstream weights. A layer is left out
    where that pass did not keep them (over `INPUTS_BUDGET`, another model or statistics set, or an upstream weight
    changed since)."""
    dig, out = content_digest(inputs), {}
    for layer in layers:
        try:
            fp = _fingerprint(model, _upstream(model, layer, inputs))
        except NetmendError:
            continue
        C = _cached((id(model), layer, dig), model, fp)
        hit = _COUNTS.get(id(C)) if C is not None else None
        if hit is not None and hit[0]() is C and hit[2] is not None:
            out[layer] = hit[2]
    return out


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
    S, count, keys, raw = _key_sums(model, {layer: m[0] for layer, m in missing.items()}, inputs, batch_size, device,
                                    keep_inputs=INPUTS_BUDGET)
    for layer, (_mod, key, fp, upstream) in missing.items():
        if count[layer] > 0:
            _store_moment(key, model, fp, _as_moment(S[layer], count[layer], keys.get(layer)), count[layer], upstream,
                          raw.get(layer))


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
    """Shape, dtype and a BLAKE2 digest of the bytes (about 10 ms for a few thousand images); kept per tensor
    object while its version counter (bumped by every in-place change) stays the same."""
    hit = _DIGESTS.get(id(x))
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        return hit[2]
    data = x.detach().cpu().contiguous()
    out = tuple(data.shape), str(data.dtype), hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy(),  # no byte copy
                                                               digest_size=16).hexdigest()
    _prune(_DIGESTS)
    _DIGESTS[id(x)] = (weakref.ref(x), x._version, out)
    return out


_DIGESTS: dict[int, tuple] = {}
_STATISTICS: dict[tuple, tuple] = {}


def statistics_inputs(defect: Defect, include_val: bool = False, include_corrupted: bool = True) -> torch.Tensor:
    """The statistics set for C: the repair fit data plus the corrupted samples (Yang et al.'s Prop. 4.1). The same
    tensor object while its parts are (the moment cache digests it on every lookup: once, then)."""
    parts = [defect.repair.x_fit]
    if include_val:
        parts.append(defect.repair.x_val)
    if include_corrupted and defect.pairs is not None and len(defect.pairs):
        parts.append(defect.pairs.corrupted)
    for k in [k for k, v in _STATISTICS.items() if any(r() is None for r, _v in v[0])]:
        del _STATISTICS[k]                       # a part is gone: so is the defect it came from
    key = tuple(id(p) for p in parts)
    hit = _STATISTICS.get(key)
    if hit is not None and all(r() is p and v == p._version for (r, v), p in zip(hit[0], parts)) \
            and hit[2] == hit[1]._version:
        return hit[1]
    out = torch.cat(parts)
    if len(_STATISTICS) >= 4:
        _STATISTICS.clear()
    _STATISTICS[key] = ([(weakref.ref(p), p._version) for p in parts], out, out._version)
    return out


# ----------------------------------------------------------------------------- directions

def ridge(C: Moment, rho: float) -> float:
    """ε = ρ·tr(C)/n; a zero C means the layer never sees a nonzero key: nothing to edit."""
    tr = _trace(C)
    finite = C.finite() if isinstance(C, KeyMoment) else bool(torch.isfinite(C).all())
    require(tr > 0 and finite, "key second moment is zero or not finite at this layer "
                                                "(its inputs are all zero on the repair data); choose another layer")
    return rho * tr / C.shape[0]


def _trace(C: Moment) -> float:
    return C.trace() if isinstance(C, KeyMoment) else float(torch.trace(C))


_FACTORS: dict[tuple, tuple] = {}


def _factor(C: Moment, rho: float) -> tuple[float, str, tuple]:
    """(ε, solver, factor) of C + εI, kept per C object and ρ: Cholesky L, or the ridge-clipped eigenpairs (w, V)
    where rounding made it indefinite. Every direction solved at a layer (the localiser's d and each edit tried
    there) uses the same factor, so it is computed once."""
    key = (id(C), float(rho))
    hit = _FACTORS.get(key)
    if hit is not None and hit[0]() is C:
        return hit[1]
    eps = ridge(C, rho)
    out = _woodbury_factor(C, eps)
    if out is None:
        A = dense(C).clone()
        A.diagonal().add_(eps)                           # C + εI (the same sums as C + ε·eye, without the eye)
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


def _woodbury_factor(C: Moment, eps: float) -> tuple[float, str, tuple] | None:
    """Where C = XᵀX/N is held as its N keys X (`KeyMoment`: fewer keys than the width n, e.g. a fully connected
    layer after a large feature map, fitted from a few thousand images), C + εI is solved through the N×N matrix
    M = XXᵀ + NεI (Woodbury): (C + εI)⁻¹b = (b − Xᵀ M⁻¹ X b) / ε. Forming and factoring M costs N²n/2 + N³/3
    against n²N/2 + n³/3 for C + εI; the solution is the same up to rounding. None where C has no keys, or M is
    not positive definite."""
    X = moment_keys(C)
    if X is None or X.shape[1] != C.shape[0] or not len(X):
        return None
    M = _gram_rows(X)
    M.diagonal().add_(len(X) * eps)
    L, err = torch.linalg.cholesky_ex(M)
    return (eps, "woodbury", (L, X)) if int(err) == 0 else None


def _gram_rows(X: torch.Tensor, strips: int = 8) -> torch.Tensor:
    """XXᵀ; from `GRAM_BLOCKED` rows on, the lower triangle strip by strip, then mirrored (2 401 keys of width
    3 136: about half the time of the full product on one thread)."""
    n = len(X)
    if n < GRAM_BLOCKED:
        return X @ X.T
    M = torch.empty(n, n, dtype=X.dtype, device=X.device)
    edges = [round(i * n / strips) for i in range(strips + 1)]
    for a, b in zip(edges, edges[1:]):
        M[a:, a:b] = X[a:] @ X[a:b].T
    return torch.tril(M) + torch.tril(M, -1).T


def solve(C: Moment, rhs: torch.Tensor, rho: float = 1e-4) -> tuple[torch.Tensor, dict[str, Any]]:
    """(C + εI)⁻¹ rhs in float64 by Cholesky, of C + εI or, where C came from few kept keys, of their Gram matrix
    (`_woodbury_factor`); fall back to an eigendecomposition (never an explicit inverse)."""
    C = C.double()
    rhs = rhs.double().to(C.device)
    vec = rhs.dim() == 1
    b = rhs[:, None] if vec else rhs
    eps, solver, f = _factor(C, rho)
    info: dict[str, Any] = {"rho": rho, "ridge": eps, "solver": solver}
    if solver == "cholesky":
        x = torch.cholesky_solve(b, f[0])
    elif solver == "woodbury":
        L, X = f
        x = (b - X.T @ torch.cholesky_solve(X @ b, L)) / eps
    else:
        w, V = f
        x = V @ ((V.T @ b) / w[:, None])
    return (x[:, 0] if vec else x), info


_EIGENVALUES: dict[int, tuple] = {}


EXACT_CONDITION_DIM = 1024   # above this width the condition number is estimated (an eigvalsh of a 3 136-wide C
                             # takes seconds on one thread; the estimate agrees with it to the digits it resolves)


def condition(C: Moment, eps: float) -> float:
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


def _extreme_eigenvalues(C: Moment, eps: float, iters: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """(λ_min, λ_max) of C (the whole ascending spectrum when it is small enough to compute exactly)."""
    C = C.double()
    n = C.shape[0]
    if n <= EXACT_CONDITION_DIM:
        return torch.linalg.eigvalsh(dense(C))

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

    X = moment_keys(C)
    top = power(lambda v: X.T @ (X @ v) / len(X)) if X is not None else power(lambda v: C @ v)
    count = moment_count(C)
    if count is not None and count < n:
        low = 0.0                                         # rank ≤ count < n: singular
    else:
        hit = next((h[1] for k, h in list(_FACTORS.items()) if k[0] == id(C) and h[0]() is C and h[1][0] == eps), None)
        e, solver, f = hit if hit is not None else _factor(C, float(eps) * n / max(_trace(C), 1e-300))
        if solver == "cholesky":
            inv = power(lambda v: torch.cholesky_solve(v[:, None], f[0])[:, 0])
            low = max(1.0 / inv - e, 0.0) if inv > 0 else 0.0
        else:
            low = max(float(f[0][0]) - e, 0.0)
    return torch.tensor([low, top], dtype=torch.float64)


def shared_direction(C: Moment, keys: torch.Tensor, weights: torch.Tensor | None = None,
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
        w, V = torch.linalg.eigh(dense(C).double() + eps * torch.eye(C.shape[0], dtype=torch.float64, device=C.device))
        w = w.clamp_min(eps)
        Wm = V @ torch.diag(w.rsqrt()) @ V.T               # C^{-1/2}
        U, _, _ = torch.linalg.svd(Wm @ K, full_matrices=False)
        d = Wm @ U[:, 0]
        info = {"rho": rho, "ridge": eps, "solver": "eigh-whiten"}
    if float((d @ K).sum()) < 0:
        d = -d
    return d / d.norm(), {**info, "protected": 0 if P is None else int(P.shape[1])}


# ----------------------------------------------------------------------------- evidence pairs
def select_pairs(defect: Defect, n: int | None = None, method: str = "rank-one editing") -> Pairs:
    """The defect's evidence pairs (the first n; all for None), checked against the model's input shape."""
    p = defect.require_pairs(method)
    p = p if n is None else p.subset(int(n))
    shape = tuple(defect.repair.x_fit.shape[1:])
    if tuple(p.corrupted.shape[1:]) != shape:
        raise NetmendError(f"pairs have sample shape {tuple(p.corrupted.shape[1:])} but the model's inputs "
                           f"have shape {shape}")
    return p


def key_mask(masks: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor | None:
    """Trigger masks (n, H, W) brought to a feature map's resolution (any touched cell counts)."""
    if masks is None:
        return None
    m = masks.float()[:, None]
    m = F.adaptive_max_pool2d(m, size) if m.shape[-2] >= size[0] else F.interpolate(m, size=size, mode="nearest")
    return m[:, 0]
