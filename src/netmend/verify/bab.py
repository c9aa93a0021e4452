"""Complete verification of a Linear/ReLU network against a box property: input-splitting branch and bound.

`verify(model, prop)` answers, for every input box of the property (a union of boxes is verified box by box,
all in the same queue):
  verified  — proved in real arithmetic over the network's weights (float64 bounds, see below): no input in
              the box(es) gives an output in the unsafe region (unsafe iff some disjunct has all C y + d ≤ 0);
  violated  — with a counterexample x (normalised units) that lies in the property's box and whose output,
              from a plain forward pass of the given model (its own dtype), is unsafe (`Property.violated`);
  unknown   — the timeout came first (or a sub-box shrank to float precision without being decided).

Method: the falsifier of the safety defect (`falsify`: batched sign-PGD from random and face-snapped starts)
runs first; then branch and bound on the input: a batch of sub-boxes is bounded in ONE tensor pass
(bounds.crown_bounds: backward linear relaxation of the property rows; intermediate bounds by per-layer CROWN
for the neurons that forward symbolic bounds leave unstable; optional alpha-CROWN steps); a box is proved when
every disjunct has a row — or an average of some of its rows — whose lower bound exceeds the tolerance.
Unproved boxes are attacked (their centre, the box vertices that minimise each row's linear lower bound, and a
few PGD steps from the best of these), and split in two along the input dimension of largest smear: interval
bound of the input gradient × width (ReluVal), summed over the disjuncts not yet proved. The queue is worked
depth first (the last boxes pushed are bounded next), a batch at a time (smaller when little time is left).

Soundness margins: the float32 box of the Property is widened outward by one float32 ulp before bounding
(covering a vnnlib bound that float32 parsing rounded inward), and a row counts as proved only when its lower
bound exceeds tol = 1e-9 + 2⁻²³·|d| (float64 rounding, and the float32 rounding of d). Counterexamples are
never taken from the bounds: a candidate must pass the plain forward check on the original model.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.vnnlib import Property
from ..errors import NetmendError
from .bounds import ReluNet, crown_bounds, gradient_interval, optimise_combination, relu_chain

STATUSES = ("verified", "violated", "unknown")


@dataclass
class VerifyResult:
    status: str                                   # verified | violated | unknown
    counterexample: torch.Tensor | None = None    # (n_in,) normalised input, inside the property's box
    output: torch.Tensor | None = None            # (n_out,) the model's output there (unsafe)
    seconds: float = 0.0
    boxes: int = 0                                # sub-boxes bounded
    max_depth: int = 0                            # deepest split level reached
    lower_bound: float | None = None              # certified lower bound of min_j max_r (C_j y + d_j)_r − tol over
                                                  # the box(es): > 0 when verified; None when violated
    root_lower_bound: float | None = None         # the same bound on the unsplit box(es)
    found_by: str = ""                            # falsifier | bab-candidate | bab-pgd (violated only)
    falsifier_seconds: float = 0.0
    reason: str = ""
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counterexample"] = None if self.counterexample is None else {
            "input": [float(v) for v in self.counterexample], "output": [float(v) for v in self.output],
            "found_by": self.found_by}
        del d["output"], d["found_by"]
        return d


def output_spec(prop: Property, dtype, device, combine: bool = True):
    """All rows of all disjuncts stacked, the disjunct × row membership mask, and per-row tolerances.

    With `combine`, each disjunct of m ≥ 2 rows also gets the uniform averages of its row subsets (all pairs
    and the whole set; every subset when m ≤ 4): a disjunct is infeasible when any convex combination of its
    rows is positive, and bounding the combined row through the network is tighter than combining bounds."""
    from itertools import combinations

    cs, ds, ts, owner, groups = [], [], [], [], []
    start = 0
    for j, (c, d) in enumerate(prop.unsafe):
        c, d = c.to(device, dtype), d.to(device, dtype)
        t = 1e-9 + d.abs() * 2.0 ** -23      # float64 rounding of the bounds; float32 rounding of d
        m = len(d)
        c0, d0, t0 = c, d, t
        w = torch.eye(m, dtype=dtype, device=device)
        subsets = []
        if combine and m >= 2:
            sizes = range(2, m + 1) if m <= 4 else (2, m)
            subsets = [s for k in sizes for s in combinations(range(m), k)]
        if subsets:
            wc = torch.zeros(len(subsets), m, dtype=dtype, device=device)
            for i, sub in enumerate(subsets):
                wc[i, list(sub)] = 1.0 / len(sub)
            c, d, t = torch.cat([c, wc @ c]), torch.cat([d, wc @ d]), torch.cat([t, wc @ t])
            w = torch.cat([w, wc])
        groups.append({"C": c0, "d": d0, "tol": t0, "rows": torch.arange(start, start + len(d), device=device),
                       "weights": w})
        start += len(d)
        cs.append(c)
        ds.append(d)
        ts.append(t)
        owner += [j] * len(d)
    C, d, tol = torch.cat(cs), torch.cat(ds), torch.cat(ts)
    owner = torch.tensor(owner, device=device)
    mask = owner.unsqueeze(0) == torch.arange(len(prop.unsafe), device=device).unsqueeze(1)   # (J, R)
    return C, d, mask, tol, groups


def bisect(lo: torch.Tensor, hi: torch.Tensor, dim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Halve every box (lo[i], hi[i]) along dimension dim[i]: the lower halves are (lo, hi_left), the upper
    halves (lo_right, hi); returns (hi_left, lo_right)."""
    ar = torch.arange(len(lo), device=lo.device)
    mid = (lo[ar, dim] + hi[ar, dim]) / 2
    hi_left, lo_right = hi.clone(), lo.clone()
    hi_left[ar, dim] = mid
    lo_right[ar, dim] = mid
    return hi_left, lo_right


def disjunct_values(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rows (..., R) -> (..., J): per disjunct, the max over its rows."""
    neg = torch.tensor(float("-inf"), dtype=rows.dtype, device=rows.device)
    return torch.where(mask, rows.unsqueeze(-2), neg).amax(-1)


def _widen(lo32: torch.Tensor, hi32: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lo32, hi32 = lo32.float(), hi32.float()
    lo = torch.nextafter(lo32, torch.full_like(lo32, float("-inf"))).to(dtype)
    hi = torch.nextafter(hi32, torch.full_like(hi32, float("inf"))).to(dtype)
    fixed = lo32 == hi32                       # a fixed input stays fixed (it is the value the property names)
    return torch.where(fixed, lo32.to(dtype), lo), torch.where(fixed, hi32.to(dtype), hi)


class _Checker:
    """Confirms candidate counterexamples with a plain forward pass of the original model."""

    def __init__(self, model: nn.Module, prop: Property, device):
        self.model, self.prop, self.device = model, prop, device
        self.dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self.lo = torch.stack([b[0] for b in prop.boxes]).to(device, self.dtype)
        self.hi = torch.stack([b[1] for b in prop.boxes]).to(device, self.dtype)

    @torch.no_grad()
    def first(self, x: torch.Tensor, root: torch.Tensor):
        """x (N, n_in) float64 candidates from sub-boxes of root boxes `root` (N,): the first confirmed one."""
        if len(x) == 0:
            return None
        xc = torch.minimum(torch.maximum(x.to(self.dtype), self.lo[root]), self.hi[root])
        y = self.model(xc)
        bad = self.prop.violated(y) & self.prop.in_box(xc)
        if bad.any():
            i = int(bad.nonzero()[0])
            return xc[i].detach().cpu(), y[i].detach().cpu()
        return None


def _pgd(net: ReluNet, C, d, mask, x0, lo, hi, steps: int):
    """Sign-PGD minimising the safety value min_j max_r (C y + d) inside each box from x0; returns the last
    iterate and the best iterate."""
    x = x0.clone()
    width = hi - lo
    best_x, best_v = x0.clone(), None
    for t in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            v = disjunct_values(net.forward(x) @ C.T + d, mask).amin(-1)
            (g,) = torch.autograd.grad(v.sum(), x)
        with torch.no_grad():
            vd = v.detach()
            if best_v is None:
                best_v = vd.clone()
            else:
                better = vd < best_v
                best_v = torch.where(better, vd, best_v)
                best_x[better] = x.detach()[better]
            size = 0.25 * (1 - t / steps) + 0.02
            x = torch.minimum(torch.maximum(x.detach() - size * width * g.sign(), lo), hi)
    return x.detach(), best_x


@torch.no_grad()
def verify(model: nn.Module, prop: Property, timeout: float = 60.0, seed: int = 0, device: str = "cpu",
           batch: int = 1024, mode: str = "crown", alpha_steps: int = 0, falsifier_starts: int = 1024,
           falsifier_steps: int = 50, pgd_steps: int = 5, max_boxes: int | None = None,
           min_width: float = 1e-10, combine: bool = True, branching: str = "gradient",
           opt_steps: int = 10, opt_after: float = 1.0, root_alpha: int = 20) -> VerifyResult:
    """Decide `prop` on `model` (Linear/ReLU chain, normalised inputs) by falsification + input-splitting BaB.

    timeout: seconds (wall clock) before answering unknown; batch: sub-boxes bounded per tensor pass;
    mode: intermediate bounds 'crown' (backward per layer for the neurons the cheap bounds leave unstable) |
    'forward' (symbolic only) | 'crown-full' | 'interval';
    alpha_steps: alpha-CROWN steps on the final pass (0: plain CROWN slopes); falsifier_starts: PGD starts of the
    up-front falsifier (0: none); pgd_steps: PGD steps on each unproved sub-box per round; max_boxes: stop with
    unknown after bounding this many sub-boxes; combine: also bound averages of each disjunct's rows;
    branching: 'gradient' (ReluVal smear: interval input gradient × width) | 'coef' (|lower-bound coefficient|
    × width) | 'lookahead' (bound both halves along every dimension, keep the best split; ~10× the bounds);
    opt_steps: once `opt_after` seconds have passed (easy instances never pay for it), sub-boxes that CROWN
    leaves unproved get `opt_steps` Adam steps on the combination λ of each open disjunct's rows and the lower
    ReLU slopes α of its backward pass (bounds.optimise_combination; 0: off); root_alpha: alpha-CROWN steps on the
    unsplit box(es) when plain CROWN does not prove them (one small pass; a property-patch network is proved there,
    where CROWN's default slope 0 on its patch neurons leaves the bound of the unpatched network)."""
    t0 = time.perf_counter()
    deadline = t0 + float(timeout)
    settings = {"timeout": timeout, "seed": seed, "batch": batch, "mode": mode, "alpha_steps": alpha_steps,
                "falsifier_starts": falsifier_starts, "pgd_steps": pgd_steps, "combine": combine,
                "branching": branching, "opt_steps": opt_steps, "opt_after": opt_after, "root_alpha": root_alpha,
                "device": str(device)}
    dev = torch.device(device)
    net = relu_chain(model).to(dev)
    if net.n_in != prop.n_inputs or net.n_out != prop.n_outputs:
        raise NetmendError(f"property {prop.name} speaks of {prop.n_inputs} inputs / {prop.n_outputs} outputs, the "
                           f"network has {net.n_in} / {net.n_out}")
    model = copy.deepcopy(model).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check = _Checker(model, prop, dev)
    dt = torch.float64
    C, d, mask, tol, groups = output_spec(prop, dt, dev, combine)

    def result(status, **kw):
        if kw.get("lower_bound") is not None and not math.isfinite(kw["lower_bound"]):
            kw["lower_bound"] = None
        return VerifyResult(status, seconds=time.perf_counter() - t0, settings=settings, **kw)

    if time.perf_counter() >= deadline:
        return result("unknown", reason="timeout before the search started")

    # 1. the falsifier (cheap; finds most ACAS Xu counterexamples)
    fal_s = 0.0
    if falsifier_starts > 0:
        from ..defects.safety import falsify

        with torch.enable_grad():
            f = falsify(model, prop, seed, starts=falsifier_starts, steps=falsifier_steps, step=0.05, want=0)
        fal_s = f.seconds
        if len(f.counterexamples):
            x = f.counterexamples[:1].to(dev)
            hit = check.first(x.to(dt), _root_of(prop, x))
            if hit is not None:
                return result("violated", counterexample=hit[0], output=hit[1], found_by="falsifier",
                              falsifier_seconds=fal_s)

    # 2. branch and bound over input boxes
    roots = [_widen(lo, hi, dt) for lo, hi in prop.boxes]
    lo_q = torch.stack([r[0] for r in roots]).to(dev)
    hi_q = torch.stack([r[1] for r in roots]).to(dev)
    root_q = torch.arange(len(roots), device=dev)
    depth_q = torch.zeros(len(roots), dtype=torch.long, device=dev)
    val_q = torch.full((len(roots),), float("-inf"), dtype=dt, device=dev)   # inherited lower bound
    proven_min = math.inf
    root_lb = None
    boxes = max_depth = 0
    stuck_lb: list[float] = []
    per_box = 0.0               # seconds per sub-box of the last round (keeps a round within the time left)
    while len(lo_q):
        if time.perf_counter() >= deadline or (max_boxes is not None and boxes >= max_boxes):
            lb = min([proven_min, float(val_q.min())] + stuck_lb)
            why = "timeout" if time.perf_counter() >= deadline else f"max_boxes {max_boxes} reached"
            return result("unknown", boxes=boxes, max_depth=max_depth, lower_bound=lb, root_lower_bound=root_lb,
                          falsifier_seconds=fal_s, reason=f"{why}: {len(lo_q)} sub-boxes left")
        t_round = time.perf_counter()
        n = min(batch, len(lo_q))
        if per_box > 0:
            n = max(1, min(n, int((deadline - t_round) / per_box)))
        lo, hi, root, depth = lo_q[-n:], hi_q[-n:], root_q[-n:], depth_q[-n:]
        lo_q, hi_q, root_q, depth_q, val_q = lo_q[:-n], hi_q[:-n], root_q[:-n], depth_q[:-n], val_q[:-n]
        b = crown_bounds(net, lo, hi, C, d, mode=mode, alpha_steps=alpha_steps)
        boxes += n
        max_depth = max(max_depth, int(depth.max()))
        eff = b.lower - tol                                   # (n, R)
        dval = disjunct_values(eff, mask)                    # (n, J)
        bval = dval.amin(-1)                                  # (n,)
        if root_lb is None and root_alpha > 0 and alpha_steps == 0 and not bool((bval > 0).all()):
            ba = crown_bounds(net, lo, hi, C, d, mode=mode, alpha_steps=root_alpha, pre=b.pre)
            eff = torch.maximum(eff, ba.lower - tol)          # both sound: the better of the two
            dval = disjunct_values(eff, mask)
            bval = dval.amin(-1)
        if root_lb is None:
            root_lb = float(bval.min())
        proved = bval > 0
        if opt_steps > 0 and not proved.all() and time.perf_counter() - t0 >= opt_after:
            # optimise λ (the combination of each open disjunct's rows) and α where CROWN fell short
            dval, bval = _optimise_open(net, b.pre, lo, hi, eff, dval, ~proved, groups, opt_steps, deadline)
            proved = bval > 0
        if proved.any():
            proven_min = min(proven_min, float(bval[proved].min()))
        open_ = ~proved
        if not open_.any():
            continue
        lo, hi, root, depth, dval, bval = lo[open_], hi[open_], root[open_], depth[open_], dval[open_], bval[open_]
        coef, rows_lb = b.coef[open_], eff[open_]
        # attack: centre + per-row minimising vertex of its linear lower bound, then PGD from the best
        verts = torch.where(coef > 0, lo.unsqueeze(1), hi.unsqueeze(1))            # (m, R, n_in)
        cand = torch.cat([((lo + hi) / 2).unsqueeze(1), verts], 1)                 # (m, R+1, n_in)
        yv = net.forward(cand) @ C.T + d
        sv = disjunct_values(yv, mask).amin(-1)                                    # (m, R+1)
        bad = sv <= 0
        if bad.any():
            hit = check.first(cand[bad], root.unsqueeze(1).expand(-1, cand.shape[1])[bad])
            if hit is not None:
                return result("violated", counterexample=hit[0], output=hit[1], boxes=boxes, max_depth=max_depth,
                              root_lower_bound=root_lb, found_by="bab-candidate", falsifier_seconds=fal_s)
        if pgd_steps > 0:
            start = cand[torch.arange(len(cand), device=dev), sv.argmin(1)]
            last, best = _pgd(net, C, d, mask, start, lo, hi, pgd_steps)
            xs = torch.cat([last, best])
            sv2 = disjunct_values(net.forward(xs) @ C.T + d, mask).amin(-1)
            if (sv2 <= 0).any():
                hit = check.first(xs[sv2 <= 0], torch.cat([root, root])[sv2 <= 0])
                if hit is not None:
                    return result("violated", counterexample=hit[0], output=hit[1], boxes=boxes,
                                  max_depth=max_depth, root_lower_bound=root_lb, found_by="bab-pgd",
                                  falsifier_seconds=fal_s)
        # split along the dimension of largest smear, summed over the disjuncts not yet proved
        width = hi - lo
        R = coef.shape[1]
        best_row = torch.where(mask.unsqueeze(0), rows_lb.unsqueeze(1), torch.tensor(float("-inf"), dtype=dt,
                                                                                     device=dev)).argmax(-1)  # (m, J)
        rowsel = torch.zeros(len(lo), R, dtype=dt, device=dev)
        rowsel.scatter_add_(1, best_row, (dval <= 0).to(dt))
        if branching == "gradient":      # ReluVal smear: interval input-gradient of the rows × width
            pre = [(l[open_], u[open_]) for l, u in b.pre]
            gl, gu = gradient_interval(net, pre, C)
            infl = torch.maximum(gl.abs(), gu.abs())
        elif branching in ("coef", "lookahead"):        # |coefficient of the linear lower bound| × width
            infl = coef.abs()
        else:
            raise NetmendError(f"unknown branching {branching!r} (gradient | coef)")
        smear = (rowsel.unsqueeze(-1) * infl).sum(1) * width                       # (m, n_in)
        smear = torch.where(smear.amax(-1, keepdim=True) > 0, smear, width)
        dim = smear.argmax(-1)
        if branching == "lookahead":
            dim = _lookahead(net, C, d, mask, tol, lo, hi, mode, batch)
        tiny = width.amax(-1) <= min_width
        if tiny.any():              # float precision reached without a decision: give up on those boxes
            stuck_lb += bval[tiny].tolist()
            keep = ~tiny
            lo, hi, root, depth, dim, bval = lo[keep], hi[keep], root[keep], depth[keep], dim[keep], bval[keep]
        hi_left, lo_right = bisect(lo, hi, dim)
        lo_q = torch.cat([lo_q, lo, lo_right])
        hi_q = torch.cat([hi_q, hi_left, hi])
        root_q = torch.cat([root_q, root, root])
        depth_q = torch.cat([depth_q, depth + 1, depth + 1])
        val_q = torch.cat([val_q, bval, bval])
        per_box = (time.perf_counter() - t_round) / n
    if stuck_lb:
        return result("unknown", boxes=boxes, max_depth=max_depth, lower_bound=min([proven_min] + stuck_lb),
                      root_lower_bound=root_lb, falsifier_seconds=fal_s,
                      reason=f"{len(stuck_lb)} sub-boxes reached width {min_width} undecided")
    return result("verified", boxes=boxes, max_depth=max_depth, lower_bound=proven_min, root_lower_bound=root_lb,
                  falsifier_seconds=fal_s)


def _optimise_open(net, pre, lo, hi, eff, dval, open_, groups, steps, deadline):
    """For the open boxes, each disjunct not yet proved: optimise_combination from the best fixed row/average."""
    dval = dval.clone()
    for j, g in enumerate(groups):
        sel = (open_ & (dval[:, j] <= 0)).nonzero(as_tuple=True)[0]
        if len(sel) == 0:
            continue
        w0 = g["weights"][eff[sel][:, g["rows"]].argmax(-1)]
        v = optimise_combination(net, [(l[sel], u[sel]) for l, u in pre], lo[sel], hi[sel], g["C"], g["d"],
                                 g["tol"], w0, steps, deadline=deadline)
        dval[sel, j] = torch.maximum(dval[sel, j], v)
    return dval, dval.amin(-1)


def _lookahead(net, C, d, mask, tol, lo, hi, mode, batch):
    m, n_in = lo.shape
    mid = (lo + hi) / 2
    eye = torch.eye(n_in, dtype=torch.bool, device=lo.device)
    lo_c = torch.stack([lo.unsqueeze(1).expand(-1, n_in, -1), torch.where(eye, mid.unsqueeze(1), lo.unsqueeze(1))], 2)
    hi_c = torch.stack([torch.where(eye, mid.unsqueeze(1), hi.unsqueeze(1)), hi.unsqueeze(1).expand(-1, n_in, -1)], 2)
    lo_c, hi_c = lo_c.reshape(-1, n_in), hi_c.reshape(-1, n_in)
    vals = []
    for i in range(0, len(lo_c), batch * 4):
        b = crown_bounds(net, lo_c[i:i + batch * 4], hi_c[i:i + batch * 4], C, d, mode=mode)
        vals.append(disjunct_values(b.lower - tol, mask).amin(-1))
    v = torch.cat(vals).reshape(m, n_in, 2)
    score = v.clamp_max(0).sum(-1)
    score = torch.where((hi - lo) > 0, score, torch.full_like(score, float("-inf")))
    return score.argmax(-1)


def _root_of(prop: Property, x: torch.Tensor) -> torch.Tensor:
    inside = torch.stack([((x >= lo.to(x)) & (x <= hi.to(x))).all(-1) for lo, hi in prop.boxes], -1)
    return inside.float().argmax(-1)
