"""Sound output bounds of a Linear/ReLU chain over batches of input boxes (float64).

`relu_chain(model)` reads an `nn.Sequential` of Linear / ReLU (a Flatten or Identity may stand in front; nested
Sequentials are flattened; consecutive Linears are folded) into a `ReluNet` of float64 weights. Everything
else is refused with a one-line NetmendError naming the layer type.

Bounds (all batched: B boxes × neurons in one tensor pass):
  * `interval_bounds`  — interval arithmetic (IBP).
  * `crown_bounds`     — linear relaxation bounds, CROWN / DeepPoly style: every ReLU with l < 0 < u is
    bounded above by the chord u (z − l)/(u − l) and below by α z, α ∈ [0, 1] (default: the CROWN choice
    α = 1 if u > −l else 0). The objective rows (the property's C y + d) are propagated BACKWARD through the
    network to the input and concretised on the box. Intermediate pre-activation bounds come from
      - "crown":   a backward pass from every hidden layer (tightest, O(layers²) passes), or
      - "forward": forward symbolic propagation of linear lower/upper functions of the input (DeepPoly/
                   Neurify-style symbolic intervals; cheap when the input is low-dimensional, as ACAS Xu's 5),
    each intersected with the interval bounds.
  * `alpha` (optional): a few projected gradient-ascent steps on the lower slopes α of the final backward
    pass (alpha-CROWN, per box and objective row; intermediate bounds stay fixed), which only tightens.

Soundness: every step is an over-approximation in real arithmetic; float64 rounding (~1e-16 relative)
is covered by the verifier's margin (bab.py requires lower bounds > a small positive tolerance).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NetmendError


@dataclass
class ReluNet:
    """y = W_L relu(... relu(W_1 x + b_1) ...) + b_L, float64 (ReLU between every pair of Linears)."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]

    @property
    def n_in(self) -> int:
        return self.weights[0].shape[1]

    @property
    def n_out(self) -> int:
        return self.weights[-1].shape[0]

    def to(self, device) -> "ReluNet":
        return ReluNet([w.to(device) for w in self.weights], [b.to(device) for b in self.biases])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward pass (float64 if x is)."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w.T + b
            if i < len(self.weights) - 1:
                h = h.clamp_min(0)
        return h


def _flat_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [m for sub in model for m in _flat_modules(sub)]
    return [model]


def relu_chain(model: nn.Module, dtype: torch.dtype = torch.float64, live: bool = False) -> ReluNet:
    """The model as a ReluNet; refuses anything but Linear / ReLU (and a leading Flatten / Identity).
    live: keep the weights attached to the model's parameters (bounds differentiable in them, for training)."""
    mods = _flat_modules(model)
    ops: list = []          # "relu" or (W, b)
    seen_linear = False
    for m in mods:
        if isinstance(m, nn.Identity):
            continue
        if isinstance(m, nn.Flatten) and not seen_linear and not ops:
            continue
        if isinstance(m, nn.Linear):
            w = m.weight if live else m.weight.detach().to("cpu", dtype)
            b = (m.bias if live else m.bias.detach().to("cpu", dtype)) if m.bias is not None else \
                torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            if ops and not isinstance(ops[-1], str):       # fold Linear ∘ Linear
                w0, b0 = ops[-1]
                ops[-1] = (w @ w0, w @ b0 + b)
            else:
                ops.append((w, b))
            seen_linear = True
            continue
        if isinstance(m, nn.ReLU):
            if not ops or ops[-1] != "relu":                # relu(relu(x)) = relu(x)
                ops.append("relu")
            continue
        where = "" if not seen_linear else " after the first Linear"
        raise NetmendError(f"verify supports Linear/ReLU chains only: unsupported layer {type(m).__name__}{where}")
    if not any(not isinstance(o, str) for o in ops):
        raise NetmendError("verify: the model has no Linear layer")
    if ops[0] == "relu":                                    # relu on the input: identity Linear in front
        first = next(o for o in ops if not isinstance(o, str))
        n = first[0].shape[1]
        ops.insert(0, (torch.eye(n, dtype=first[0].dtype, device=first[0].device),
                       torch.zeros(n, dtype=first[0].dtype, device=first[0].device)))
    if ops[-1] == "relu":                                   # relu on the output: identity Linear behind
        last = ops[-2][0]
        n = last.shape[0]
        ops.append((torch.eye(n, dtype=last.dtype, device=last.device), torch.zeros(n, dtype=last.dtype, device=last.device)))
    ws = [o[0].contiguous() for o in ops if not isinstance(o, str)]
    bs = [o[1].contiguous() for o in ops if not isinstance(o, str)]
    for i in range(1, len(ws)):
        if ws[i].shape[1] != ws[i - 1].shape[0]:
            raise NetmendError(f"verify: layer sizes do not chain ({ws[i - 1].shape[0]} -> {ws[i].shape[1]})")
    return ReluNet(ws, bs)


# ---------------------------------------------------------------- interval bounds

def _affine_interval(lo, hi, w, b):
    c, r = (hi + lo) / 2, (hi - lo) / 2
    mid = c @ w.T + b
    rad = r @ w.abs().T
    return mid - rad, mid + rad


def interval_bounds(net: ReluNet, lo: torch.Tensor, hi: torch.Tensor):
    """IBP. Returns ([(l_k, u_k)] pre-activation bounds of every hidden layer, (y_lo, y_hi)); each (B, n_k)."""
    pre = []
    l, u = _affine_interval(lo, hi, net.weights[0], net.biases[0])
    for w, b in zip(net.weights[1:], net.biases[1:]):
        pre.append((l, u))
        l, u = _affine_interval(l.clamp_min(0), u.clamp_min(0), w, b)
    return pre, (l, u)


# ---------------------------------------------------------------- linear relaxation

def _relax(l: torch.Tensor, u: torch.Tensor):
    """ReLU relaxation from pre-activation bounds: upper slope/intercept (a ≤ su z + bu), default lower slope,
    and the unstable mask."""
    unstable = (l < 0) & (u > 0)
    active = l >= 0
    denom = torch.where(unstable, u - l, torch.ones_like(u))
    su = torch.where(unstable, u / denom, active.to(u.dtype))
    bu = torch.where(unstable, -su * l, torch.zeros_like(u))
    sl = torch.where(unstable, (u > -l).to(u.dtype), active.to(u.dtype))
    return su, bu, sl, unstable


def _backward(net: ReluNet, upto: int, rows: torch.Tensor, relax: list, lo, hi, alphas: list | None = None):
    """Lower bounds over the boxes of rows · z_upto (z_upto: pre-activation of Linear `upto`, 0-based; upto = L-1
    is the output). rows: (R, n_upto) or (B, R, n_upto). relax[k] = (su, bu, sl, unstable) of hidden layer k
    (after Linear k). alphas[k] (B, R, n_k) overrides the lower slopes of unstable neurons.
    Returns (lower (B, R), A (B, R, n_in), const (B, R)) with rows·z ≥ A x + const on the box."""
    B = lo.shape[0]
    lam = rows if rows.dim() == 3 else rows.unsqueeze(0).expand(B, -1, -1)
    const = lam @ net.biases[upto]                           # (B, R)
    for k in range(upto - 1, -1, -1):
        lam = lam @ net.weights[k + 1]                       # coefficient on a_k (B, R, n_k)
        su, bu, sl, unstable = relax[k]
        if alphas is not None and alphas[k] is not None:
            sl = torch.where(unstable.unsqueeze(1), alphas[k], sl.unsqueeze(1))
        else:
            sl = sl.unsqueeze(1)
        pos, neg = lam.clamp_min(0), lam.clamp_max(0)
        const = const + (neg * bu.unsqueeze(1)).sum(-1)
        lam = pos * sl + neg * su.unsqueeze(1)               # coefficient on z_k
        const = const + lam @ net.biases[k]
    a = lam @ net.weights[0]                                 # (B, R, n_in)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    lower = (a @ c.unsqueeze(-1)).squeeze(-1) - (a.abs() @ r.unsqueeze(-1)).squeeze(-1) + const
    return lower, a, const


def _forward_symbolic(net: ReluNet, lo, hi, ibp_pre):
    """Forward symbolic intervals: for each hidden layer, linear lower/upper functions of x bounding z_k,
    concretised and intersected with IBP. Returns [(l_k, u_k)]."""
    c, r = (hi + lo) / 2, (hi - lo) / 2
    B = lo.shape[0]
    w0 = net.weights[0].unsqueeze(0).expand(B, -1, -1)
    al, cl = w0, net.biases[0].unsqueeze(0).expand(B, -1)   # lower: z ≥ al x + cl
    au, cu = w0, cl                                         # upper: z ≤ au x + cu
    out = []
    for k in range(len(net.weights) - 1):
        l = (al @ c.unsqueeze(-1)).squeeze(-1) - (al.abs() @ r.unsqueeze(-1)).squeeze(-1) + cl
        u = (au @ c.unsqueeze(-1)).squeeze(-1) + (au.abs() @ r.unsqueeze(-1)).squeeze(-1) + cu
        il, iu = ibp_pre[k]
        l, u = torch.maximum(l, il), torch.minimum(u, iu)
        out.append((l, u))
        if k == len(net.weights) - 2:
            break
        su, bu, sl, _ = _relax(l, u)
        # a_k ≥ sl * z ≥ sl * (al x + cl)  (sl ≥ 0);  a_k ≤ su * z + bu ≤ su * (au x + cu) + bu
        pal, pcl = sl.unsqueeze(-1) * al, sl * cl
        pau, pcu = su.unsqueeze(-1) * au, su * cu + bu
        w, b = net.weights[k + 1], net.biases[k + 1]
        wp, wn = w.clamp_min(0), w.clamp_max(0)
        al, cl = wp @ pal + wn @ pau, pcl @ wp.T + pcu @ wn.T + b
        au, cu = wp @ pau + wn @ pal, pcu @ wp.T + pcl @ wn.T + b
    return out


def intermediate_bounds(net: ReluNet, lo: torch.Tensor, hi: torch.Tensor, mode: str = "forward"):
    """Pre-activation bounds [(l_k, u_k)] of every hidden layer: 'interval', 'forward' or 'crown'."""
    ibp_pre, _ = interval_bounds(net, lo, hi)
    if mode == "interval" or len(net.weights) == 1:
        return ibp_pre
    if mode == "forward":
        return _forward_symbolic(net, lo, hi, ibp_pre)
    if mode == "crown-full":
        return _crown_full(net, lo, hi, ibp_pre)
    if mode != "crown":
        raise NetmendError(f"unknown bound mode {mode!r} (interval | forward | crown | crown-full)")
    return _crown_unstable(net, lo, hi)


def _crown_full(net: ReluNet, lo, hi, ibp_pre):
    """Per-layer CROWN: a backward pass from every neuron of every hidden layer (reference implementation)."""
    pre = [ibp_pre[0]]          # first layer: interval bounds are exact for an affine map of a box
    relax = [_relax(*ibp_pre[0])]
    for k in range(1, len(net.weights) - 1):
        n = net.weights[k].shape[0]
        eye = torch.eye(n, dtype=lo.dtype, device=lo.device)
        low, _, _ = _backward(net, k, torch.cat([eye, -eye]), relax, lo, hi)
        l, u = torch.maximum(low[:, :n], ibp_pre[k][0]), torch.minimum(-low[:, n:], ibp_pre[k][1])
        pre.append((l, u))
        relax.append(_relax(l, u))
    return pre


def _crown_unstable(net: ReluNet, lo, hi):
    """Per-layer CROWN where it matters: layer by layer, cheap bounds first (forward symbolic functions built on
    the already refined earlier layers, intersected with interval bounds of those), then a backward CROWN pass
    only for the (box, neuron) pairs still unstable, gathered into one ragged batch."""
    c, r = (hi + lo) / 2, (hi - lo) / 2
    B = lo.shape[0]
    w0, b0 = net.weights[0], net.biases[0]
    l, u = _affine_interval(lo, hi, w0, b0)
    pre = [(l, u)]
    relax = [_relax(l, u)]
    al = au = w0.unsqueeze(0).expand(B, -1, -1)
    cl = cu = b0.unsqueeze(0).expand(B, -1)
    for k in range(1, len(net.weights) - 1):
        su, bu, sl, _ = relax[k - 1]
        pal, pcl = sl.unsqueeze(-1) * al, sl * cl
        pau, pcu = su.unsqueeze(-1) * au, su * cu + bu
        w, b = net.weights[k], net.biases[k]
        wp, wn = w.clamp_min(0), w.clamp_max(0)
        al, cl = wp @ pal + wn @ pau, pcl @ wp.T + pcu @ wn.T + b
        au, cu = wp @ pau + wn @ pal, pcu @ wp.T + pcl @ wn.T + b
        l = (al @ c.unsqueeze(-1)).squeeze(-1) - (al.abs() @ r.unsqueeze(-1)).squeeze(-1) + cl
        u = (au @ c.unsqueeze(-1)).squeeze(-1) + (au.abs() @ r.unsqueeze(-1)).squeeze(-1) + cu
        il, iu = _affine_interval(pre[-1][0].clamp_min(0), pre[-1][1].clamp_min(0), w, b)
        l, u = torch.maximum(l, il), torch.minimum(u, iu)
        bi, ni = ((l < 0) & (u > 0)).nonzero(as_tuple=True)
        if len(bi):
            rows = w[ni]                                        # (P, n_{k-1}): coefficient on a_{k-1}
            lam = torch.stack([rows, -rows], 1)                 # (P, 2, n_{k-1})
            const = torch.stack([b[ni], -b[ni]], 1)             # (P, 2)
            for m in range(k - 1, -1, -1):
                msu, mbu, msl, _ = relax[m]
                msu, mbu, msl = msu[bi].unsqueeze(1), mbu[bi].unsqueeze(1), msl[bi].unsqueeze(1)
                pos, neg = lam.clamp_min(0), lam.clamp_max(0)
                const = const + (neg * mbu).sum(-1)
                lam = pos * msl + neg * msu                     # coefficient on z_m
                const = const + lam @ net.biases[m]
                lam = lam @ net.weights[m]                      # on a_{m-1} (m > 0) or on x (m = 0)
            low = (lam @ c[bi].unsqueeze(-1)).squeeze(-1) - (lam.abs() @ r[bi].unsqueeze(-1)).squeeze(-1) + const
            l = l.index_put((bi, ni), torch.maximum(l[bi, ni], low[:, 0]))
            u = u.index_put((bi, ni), torch.minimum(u[bi, ni], -low[:, 1]))
        pre.append((l, u))
        relax.append(_relax(l, u))
    return pre


@dataclass
class Bounds:
    lower: torch.Tensor          # (B, R) lower bounds of the rows C y + d
    upper: torch.Tensor | None   # (B, R) upper bounds (crown_bounds(..., upper=True))
    coef: torch.Tensor           # (B, R, n_in): C y + d ≥ coef · x + const on each box
    const: torch.Tensor          # (B, R)
    unstable: int                # unstable ReLUs summed over the batch (a measure of looseness)
    pre: list | None = None      # [(l_k, u_k)] pre-activation bounds of the hidden layers used


def gradient_interval(net: ReluNet, pre: list, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds on the input gradient of rows · y over each box (ReluVal-style): each ReLU's derivative
    lies in {0}, {1} or [0, 1] by its pre-activation bounds. rows (R, K) or (B, R, K) -> (gl, gu) (B, R, n_in)."""
    B = pre[0][0].shape[0] if pre else 1
    gl = rows if rows.dim() == 3 else rows.unsqueeze(0).expand(B, -1, -1)
    gu = gl
    for k in range(len(net.weights) - 1, 0, -1):
        w = net.weights[k]
        mid, rad = (gl + gu) / 2 @ w, (gu - gl) / 2 @ w.abs()
        gl, gu = mid - rad, mid + rad                            # gradient w.r.t. a_{k-1}
        l, u = pre[k - 1]
        dl = (l >= 0).to(gl.dtype).unsqueeze(1)                  # derivative interval [dl, du] ⊂ [0, 1]
        du = (u > 0).to(gl.dtype).unsqueeze(1)
        gl, gu = torch.minimum(gl * dl, gl * du), torch.maximum(gu * dl, gu * du)
    w = net.weights[0]
    mid, rad = (gl + gu) / 2 @ w, (gu - gl) / 2 @ w.abs()
    return mid - rad, mid + rad


def crown_bounds(net: ReluNet, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor | None = None,
                 d: torch.Tensor | None = None, mode: str = "forward", upper: bool = False,
                 alpha_steps: int = 0, alpha_lr: float = 0.5, pre=None) -> Bounds:
    """Bounds of C y + d (default: the outputs y) over each box [lo_b, hi_b] (lo, hi: (B, n_in), float64).
    Backward linear relaxation for the rows; intermediate bounds by `mode` (or given as `pre`)."""
    dt, dev = lo.dtype, lo.device
    K = net.n_out
    C = torch.eye(K, dtype=dt, device=dev) if C is None else C.to(dev, dt)
    d = torch.zeros(C.shape[0], dtype=dt, device=dev) if d is None else d.to(dev, dt)
    L = len(net.weights)
    if pre is None:
        pre = intermediate_bounds(net, lo, hi, mode)
    relax = [_relax(l, u) for l, u in pre]
    rows = torch.cat([C, -C]) if upper else C
    R = C.shape[0]
    low, a, const = _backward(net, L - 1, rows, relax, lo, hi)
    if alpha_steps > 0 and L > 1 and any(bool(r[3].any()) for r in relax):
        low, a, const = _optimise_alpha(net, rows, relax, lo, hi, low, a, const, alpha_steps, alpha_lr)
    low = low + torch.cat([d, -d]) if upper else low + d
    const = const + (torch.cat([d, -d]) if upper else d)
    unstable = int(sum(int(r[3].sum()) for r in relax))
    if upper:
        return Bounds(low[:, :R], -low[:, R:], a[:, :R], const[:, :R], unstable, pre)
    return Bounds(low, None, a, const, unstable, pre)


def _optimise_alpha(net, rows, relax, lo, hi, low0, a0, c0, steps: int, lr: float):
    """alpha-CROWN on the final backward pass: projected gradient ascent on the lower slopes (per box, row and
    unstable neuron), starting from the CROWN choice; keeps, per box and row, the best bound seen."""
    B, R = low0.shape
    alphas = []
    for su, bu, sl, unstable in relax:
        alphas.append(sl.unsqueeze(1).expand(B, R, -1).clone().requires_grad_(True))
    best, best_a, best_c = low0.clone(), a0.clone(), c0.clone()
    opt = torch.optim.Adam(alphas, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            low, a, c = _backward(net, len(net.weights) - 1, rows, relax, lo, hi, alphas)
            with torch.no_grad():
                better = low > best
                best = torch.where(better, low, best)
                best_a = torch.where(better.unsqueeze(-1), a, best_a)
                best_c = torch.where(better, c, best_c)
            opt.zero_grad()
            (-low.sum()).backward()
            opt.step()
            with torch.no_grad():
                for al in alphas:
                    al.clamp_(0, 1)
    with torch.no_grad():
        low, a, c = _backward(net, len(net.weights) - 1, rows, relax, lo, hi, [al.detach() for al in alphas])
        better = low > best
        best = torch.where(better, low, best)
        best_a = torch.where(better.unsqueeze(-1), a, best_a)
        best_c = torch.where(better, c, best_c)
    return best, best_a, best_c


def optimise_combination(net: ReluNet, pre: list, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor,
                         d: torch.Tensor, tol: torch.Tensor, w0: torch.Tensor, steps: int = 10,
                         lr: float = 0.2, deadline: float | None = None) -> torch.Tensor:
    """Per box, a lower bound of max_r (C y + d − tol)_r over the box (C: the m rows of one disjunct), maximised
    over λ in the simplex and the lower ReLU slopes α (alpha-CROWN) of the backward pass for the single row
    λ·C: any λ ≥ 0 summing to 1 gives max_r ≥ λ·(C y + d − tol) ≥ its CROWN lower bound, so every iterate
    is sound; the best per box is returned (B,). w0 (B, m): the starting λ. Intermediate bounds `pre` stay
    fixed. deadline (a time.perf_counter() value): stop stepping once it has passed."""
    relax = [_relax(l, u) for l, u in pre]
    B = lo.shape[0]
    theta = torch.log(w0 + 1e-3).clone().requires_grad_(True)
    alphas = [r[2].unsqueeze(1).clone().requires_grad_(True) for r in relax]
    opt = torch.optim.Adam([theta] + alphas, lr=lr)
    best = torch.full((B,), float("-inf"), dtype=lo.dtype, device=lo.device)
    with torch.enable_grad():
        for t in range(steps + 1):
            lam = torch.softmax(theta, -1)                               # (B, m), in the simplex
            rows = (lam @ C).unsqueeze(1)                                # (B, 1, K)
            low, _, _ = _backward(net, len(net.weights) - 1, rows, relax, lo, hi, alphas)
            val = low.squeeze(1) + lam @ (d - tol)
            best = torch.maximum(best, val.detach())
            if t == steps or (deadline is not None and time.perf_counter() > deadline):
                break
            opt.zero_grad()
            (-val.sum()).backward()
            opt.step()
            with torch.no_grad():
                for al in alphas:
                    al.clamp_(0, 1)
    return best
