"""Implicit Backdoor Adversarial Unlearning (i-BAU; Zeng et al., ICLR 2022), a peer backdoor defence.

i-BAU solves the minimax problem

    min_θ  H(δ*(θ), θ),   H(δ, θ) = mean_i CE(f_θ(x_i + δ), y_i),   δ*(θ) = argmax_{‖δ‖₂ ≤ C} mean_i CE(f_θ(x_i + δ), y_i)

on clean data: the inner problem finds one *universal* perturbation δ (one image-shaped tensor added to every input)
that hurts the model most — on a backdoored model the trigger is such a perturbation, so δ drifts towards it — and
the outer problem teaches the model to classify x + δ correctly, which unlearns the shortcut. Because δ* depends on θ,
the outer gradient has an implicit term. With δ* a fixed point of the inner update Φ(δ, θ) = P_C(δ − η ∇_δ L_in(δ, θ)),
L_in(δ, θ) = −mean CE(f_θ(x + δ), y) + λ‖δ‖², the implicit function theorem gives

    dH/dθ = ∂H/∂θ + (∂Φ/∂θ)ᵀ v,   (I − ∂Φ/∂δ)ᵀ v = ∂H/∂δ,

and v is approximated by K fixed-point (Neumann) iterations v ← (∂Φ/∂δ)ᵀ v + ∂H/∂δ (the reference's
`hypergrad.fixed_point`), or by K conjugate-gradient steps (`hypergrad="cg"`, for a symmetric I − ∂Φ/∂δ). Every
product is a vector-Jacobian product through autograd: nothing is materialised. `hypergrad="none"` drops the
implicit term (δ* treated as a constant: plain adversarial training against a universal perturbation).

Per round (`rounds`): δ starts at 0 and takes one SGD pass (lr `inner_lr`) over the clean batches on L_in, projected
onto the ball ‖δ‖₂ ≤ C after each step; then, for every clean batch, the hypergradient at that δ sets the gradient of
all parameters and the outer optimiser (Adam, lr `lr`) steps. In the outer loss δ is added to a random `portion` of
each batch's rows (the reference code's 1 %), at least one row.

Differences from the reference code (YiZeng623/I-BAU, BackdoorBench defense/i-bau.py):
- δ is projected onto the L2 ball after every inner step and the projection is part of the differentiated map Φ
  (the reference has the projection `min(1, 10/‖δ‖)` commented out and bounds δ only by the λ‖δ‖² term);
- the inner loss uses the true labels both in the δ search and in Φ (the reference searches δ against the model's
  own predictions but differentiates a Φ built on true labels), and Φ is evaluated on the current outer batch (the
  reference always uses the first batch), so δ* is a fixed point of the very map that is differentiated;
- C defaults to √(d/3072) · 10 for d input values: the same per-value RMS as the paper's ‖δ‖₂ ≤ 10 on 32×32×3
  CIFAR-10 images;
- at least one row per batch carries δ (int(n · 1 %) is 0 for batches under 100 rows);
- the batch defaults to min(256, ⌈n/10⌉) for n clean samples: BackdoorBench's 256 on its 2,500 CIFAR-10 images
  makes about ten δ steps and ten outer steps per round, which netmend's small repair sets would cut to one.

The hypergradient is the reference's (fixed-point iterations through Φ, θ-dependence included), not a
simplification; `hypergrad="none"` is the simplification, offered for comparison. The Edit's meta records, per
round, ‖δ‖, the share of clean inputs whose prediction δ changes, and the class δ sends most of them to (a class
other than the attack's target means the search found a generic universal perturbation, not the trigger).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import require
from ..methods import MethodPreset
from ..progress import progress
from ..registry import METHODS, REPAIRERS
from ..sites import Sites

log = logging.getLogger("netmend")

IBAU_PAPER = "Zeng et al., ICLR 2022"


@dataclass
class IbauConfig:
    rounds: int = 5                  # unlearning rounds: a fresh δ, then one pass of outer steps (n_rounds)
    hypergrad_iters: int = 5         # K: fixed-point / CG iterations of the implicit hypergradient (K)
    hypergrad: str = "fixed_point"   # fixed_point (reference) | cg | none (drop the implicit term)
    lr: float = 1e-4                 # outer learning rate (BackdoorBench 1e-4; the reference code 1e-3)
    optimizer: str = "adam"          # outer optimiser: adam | sgd
    batch_size: int | None = None    # clean samples per batch; None: BackdoorBench's 256, at most ⌈n/10⌉ for n samples
    inner_lr: float = 10.0           # SGD step of the δ search (reference: lr 10)
    inner_epochs: int = 1            # passes of the δ search over the clean batches per round (reference: 1)
    inner_reg: float = 1e-3          # λ of the inner loss's λ‖δ‖² term (reference: 0.001)
    radius: float | None = None      # C: L2 bound of δ; None: 10·√(d/3072) for d input values
    fp_step: float = 0.1             # η of the fixed-point map Φ(δ) = P(δ − η∇L_in) (reference GradientDescent(0.1))
    portion: float = 0.01            # share of each batch's rows that carry δ in the outer loss (reference: 0.01)
    use_pairs: bool = False          # add the evidence pairs' cleansed twins to the clean data (i-BAU uses clean data only)
    seed: int = 0
    device: str = "cpu"


def default_radius(shape) -> float:
    """10 · √(d / 3072): the paper's CIFAR-10 bound, at the same RMS per input value."""
    return 10.0 * math.sqrt(math.prod(shape) / 3072)


def default_batch(n: int) -> int:
    """BackdoorBench's batch of 256, but at most ⌈n/10⌉: its CIFAR-10 setting (2,500 clean images) makes about ten
    δ steps and ten outer steps per round, which a batch of 256 on a few hundred samples would cut to one."""
    return max(1, min(256, math.ceil(n / 10)))


def project_l2(delta: torch.Tensor, radius: float | None) -> torch.Tensor:
    """δ scaled onto the ball ‖δ‖₂ ≤ radius when outside it (differentiable; radius None: unchanged)."""
    if radius is None:
        return delta
    return delta * torch.clamp(radius / (delta.norm() + 1e-12), max=1.0)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def implicit_hypergradient(delta: torch.Tensor, params: list[torch.Tensor],
                           fp_map: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
                           outer_loss: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
                           iters: int, method: str = "fixed_point", tol: float = 1e-10) -> list[torch.Tensor]:
    """d/dθ outer_loss(δ*(θ), θ) at δ* = delta, a fixed point of δ = fp_map(δ, θ), for θ = params.

    ∂L/∂θ + (∂Φ/∂θ)ᵀ v with (I − ∂Φ/∂δ)ᵀ v = ∂L/∂δ, v from `iters` fixed-point iterations v ← (∂Φ/∂δ)ᵀ v + ∂L/∂δ
    started at 0 (a truncated Neumann series; `fixed_point`), or `iters` conjugate-gradient steps (`cg`; needs
    I − ∂Φ/∂δ symmetric positive definite, as for a gradient step on a locally convex inner loss); `none`: ∂L/∂θ."""
    require(method in ("fixed_point", "cg", "none"), f"hypergrad must be 'fixed_point', 'cg' or 'none', got {method!r}")
    delta = delta.detach().requires_grad_(True)
    loss = outer_loss(delta, params)
    g_delta, *g_params = torch.autograd.grad(loss, [delta, *params], allow_unused=True)
    g_delta = torch.zeros_like(delta) if g_delta is None else g_delta
    g_params = [torch.zeros_like(p) if g is None else g for g, p in zip(g_params, params)]
    if method == "none":
        return g_params
    mapped = fp_map(delta, params)

    def jt(v: torch.Tensor) -> torch.Tensor:           # (∂Φ/∂δ)ᵀ v
        (g,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        return g

    if method == "fixed_point":
        v = torch.zeros_like(delta)
        for _ in range(iters):
            new = jt(v) + g_delta
            done = float((new - v).norm()) < tol
            v = new
            if done:
                break
    else:                                               # CG on (I − Jᵀ) v = g_δ
        v = torch.zeros_like(delta)
        r = g_delta.clone()
        p = r.clone()
        rs = float((r * r).sum())
        for _ in range(iters):
            if rs ** 0.5 < tol:
                break
            ap = p - jt(p)
            a = rs / float((p * ap).sum())
            v = v + a * p
            r = r - a * ap
            new = float((r * r).sum())
            p = r + (new / rs) * p
            rs = new
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [g + (i if i is not None else 0) for g, i in zip(g_params, implicit)]


class _Losses:
    """i-BAU's inner loss, fixed-point map and outer loss on one batch, for a model whose parameters are θ."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: IbauConfig, radius: float | None,
                 rows: torch.Tensor, output=None):
        self.model, self.x, self.y, self.cfg, self.radius, self.rows = model, x, y, cfg, radius, rows
        self.out = output or (lambda z: z)

    def inner(self, delta: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(self.out(self.model(self.x + delta)), self.y)
        return -ce + self.cfg.inner_reg * delta.pow(2).sum()

    def fp_map(self, delta: torch.Tensor, _params) -> torch.Tensor:
        (g,) = torch.autograd.grad(self.inner(delta), delta, create_graph=True)
        return project_l2(delta - self.cfg.fp_step * g, self.radius)

    def outer(self, delta: torch.Tensor, _params) -> torch.Tensor:
        sel = self.rows.to(self.x.dtype).view(-1, *([1] * (self.x.dim() - 1)))
        return F.cross_entropy(self.out(self.model(self.x + sel * delta)), self.y)


def universal_perturbation(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: IbauConfig,
                           radius: float | None, output=None) -> torch.Tensor:
    """i-BAU's inner maximisation: δ (one input's shape, batch dim 1) from 0 by SGD (lr inner_lr) on
    −CE(f(x + δ), y) + λ‖δ‖², one step per batch, `inner_epochs` passes, projected onto ‖δ‖₂ ≤ radius each step."""
    out = output or (lambda z: z)
    delta = torch.zeros((1, *batches[0][0].shape[1:]), device=batches[0][0].device, requires_grad=True)
    for _ in range(cfg.inner_epochs):
        for xb, yb in batches:
            loss = -F.cross_entropy(out(model(xb + delta)), yb) + cfg.inner_reg * delta.pow(2).sum()
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta.copy_(project_l2(delta - cfg.inner_lr * g, radius))
    return delta.detach()


def _check(cfg: IbauConfig) -> None:
    require(cfg.hypergrad in ("fixed_point", "cg", "none"),
            f"hypergrad must be 'fixed_point', 'cg' or 'none', got {cfg.hypergrad!r}")
    require(cfg.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    require(cfg.hypergrad_iters >= 1, f"hypergrad_iters must be ≥ 1, got {cfg.hypergrad_iters}")
    require(cfg.inner_lr > 0, f"inner_lr must be > 0, got {cfg.inner_lr}")
    require(cfg.fp_step > 0, f"fp_step must be > 0, got {cfg.fp_step}")
    require(cfg.inner_reg >= 0, f"inner_reg must be ≥ 0, got {cfg.inner_reg}")
    require(cfg.radius is None or cfg.radius > 0, f"radius must be > 0 (or None for the default), got {cfg.radius}")
    require(0 <= cfg.portion <= 1, f"portion must be in [0, 1], got {cfg.portion}")


@REPAIRERS.register("i-bau", "i-BAU: unlearn a universal adversarial perturbation, implicit hypergradient",
                    config=IbauConfig, needs=("argmax",))
def ibau(model: nn.Module, defect: Defect, sites: Sites | None, cfg: IbauConfig) -> Edit:
    _check(cfg)
    if sites is not None and len(sites):
        log.warning("i-bau tunes every parameter: the localiser's sites are ignored")
    work = copy.deepcopy(model).to(cfg.device).eval()      # eval throughout, as the reference (BN statistics fixed)
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    x, y = defect.tuning_set(cfg.use_pairs)
    require(len(x) > 0, "i-bau needs clean repair data")
    x, y = x.to(cfg.device), y.to(cfg.device)
    radius = cfg.radius if cfg.radius is not None else default_radius(x.shape[1:])
    batch = cfg.batch_size if cfg.batch_size is not None else default_batch(len(x))
    params = [p for p in work.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9))
    g = torch.Generator().manual_seed(cfg.seed)
    norms, flips, pulls = [], [], []
    steps = cfg.rounds * ((len(x) + batch - 1) // batch)
    with progress("i-bau: adversarial unlearning", total=steps) as bar:
        for _ in range(cfg.rounds):
            perm = torch.randperm(len(x), generator=g).to(x.device)
            batches = [(x[perm[i: i + batch]], y[perm[i: i + batch]])
                       for i in range(0, len(x), batch)]
            delta = universal_perturbation(work, batches, cfg, radius, defect.decision_logits)
            norms.append(float(delta.norm()))
            with torch.no_grad():          # share of the clean data δ moves off its prediction, and where most go
                moved = work(x + delta).argmax(1)
                flips.append(float((moved != work(x).argmax(1)).float().mean()))
                top = torch.bincount(moved).argmax()
                pulls.append([int(top), float((moved == top).float().mean())])
            for xb, yb in batches:
                n = len(xb)
                k = min(n, max(1, int(n * cfg.portion))) if cfg.portion > 0 else 0
                rows = torch.zeros(n, dtype=torch.bool, device=xb.device)
                rows[torch.randperm(n, generator=g)[:k].to(xb.device)] = True
                losses = _Losses(work, xb, yb, cfg, radius, rows, defect.decision_logits)
                grads = implicit_hypergradient(delta, params, losses.fp_map, losses.outer, cfg.hypergrad_iters,
                                               cfg.hypergrad)
                opt.zero_grad(set_to_none=True)
                for p, gr in zip(params, grads):
                    p.grad = gr.detach()
                opt.step()
                bar.advance()
    work.cpu()
    meta = {"repairer": "i-bau", "samples": len(y), "radius": radius, "batch_size": batch, "hypergrad": cfg.hypergrad,
            "delta_norms": norms, "delta_flip_rates": flips, "delta_top_class": pulls}
    return Edit.between(before, work, meta, names=[n for n, _ in work.named_parameters()])


METHODS.add("i-bau", MethodPreset(None, "i-bau", uses_pairs=False, paper=IBAU_PAPER, defects=("backdoor",)),
            "i-BAU: minimax unlearning of a universal adversarial perturbation with implicit hypergradients (peer defence)")
