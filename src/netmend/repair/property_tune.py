"""Property-guided fine-tuning for safety defects — netmend's own gradient repair, not one of the four papers.

Why it exists: CARE scales neurons, and on ACAS Xu N3,3 with the strengthened φ2 even the scales of all 300 hidden
units, fitted by gradient, keep only ~97 % of the advisories outside the property box
(benchmarks/results/care_ceiling.md). Tuning every weight on a FIXED sample set overfits it instead (on the dev
seeds: 99 % agreement on 40 000 keep samples, 97 % on fresh ones, and violations left in the box). So every step
here draws fresh inputs from the defect (`sample_fresh`, a repair-only random stream): a batch from the box, where
every point must be safe by a margin κ (hinge on the property's violation margin), and a batch from the rest of
the domain, where the original network's decision must stay (hinge on the decision margin); plus the evidence
counterexamples with the advisory each should take. The defect's metrics draw their own points with other seeds.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..defects.capabilities import require_capability
from ..edit import Edit
from ..errors import NetmendError, first_line, require
from ..methods import MethodPreset
from ..inference import chain_forward
from ..registry import METHODS, REPAIRERS
from ..sites import Sites
from ..train import masked_step
from .finetune import site_parameters


# Defaults chosen on N3,3 strengthened φ2 with the dev seeds 30 / 31 / 32 (never the metric's seed 0); every run
# there ended with 0 violations in 10⁶ uniform box samples and 0 held-out violations. Fidelity outside the box:
# keep weight 4 → 99.0 / 98.8 / 98.9 % (a scratch prototype of this loop), 10 → 98.9 / 99.0 / 98.9,
# 20 → 99.0 / 99.1 / 99.0, 40 → 99.1 / 99.1 / 98.9;
# 40 with 32 768 domain draws a step instead of 8 192 → 99.4 / 99.4 / 99.4 % (the keep term's noise was the
# limit). Tried and dropped: keep margin 0.01 (99.0–99.2 %, but the falsifier found 5–11 violations), a cosine
# decay from lr 3e-3 (5–9), 16 384 box points a step (5), 1 000 steps (1 on seed 30). N2,9 φ8, dev seed 30:
# 0 / 0 / 0 % / 99.6 %. Those runs took 2 000 steps; the default is now 500 sampled steps followed by bound-guided
# rounds, because the verifier's bounds, not more samples, close the last gap (N2,9 φ8: 2 000 sampled steps left it
# unproved; benchmarks/results/acasxu_all.md for every violated instance).
# Tried for the fidelity gap (mean 99.44 %, min 98.67 % over the 47 violated instances) and NOT adopted, because it
# does not hold across networks: a KL distillation towards the original outside the box (softmax of the decision
# logits at T = the median top-two margin, ~1e-3 on ACAS Xu), weight 4, with the step cosine-decayed over 1 000
# steps. Dev seed 30: N2,1 φ2 99.33 → 99.82 %, N4,9 φ2 → 99.63 %, both verified. But on N1,3 φ2 (seed 0), where the
# box hinge stays active (the κ = 0.01 margin is ~10× that network's decision margins), the distillation fights the
# box term: 11 % fidelity when it ran only in steps with a safe box batch, 97.5 % when always on (this loop: 99.12).
# Started after these 500 steps instead, as a polish kept only if fresh repair-stream points improve, it gained
# little (N2,1: 99.33 → 99.36). The fidelity errors lie all over the domain at points whose original top-two margin
# is ~4e-4, not near the box.
@dataclass
class PropertyTuneConfig:
    steps: int = 500
    lr: float = 1e-3                  # Adam, constant
    box_batch: int = 4096             # fresh box points per step
    keep_batch: int = 32768           # fresh domain draws per step (those outside the box are kept)
    margin: float = 0.01              # κ: box points must satisfy the property by this margin
    keep_margin: float = 0.001        # the original decision must win by this margin outside the box
    box_weight: float = 10.0
    keep_weight: float = 40.0
    evidence_weight: float = 1.0
    # Bound-guided rounds (Linear/ReLU networks): after `steps`, the verifier (netmend.verify) is asked; while it
    # does not prove the property, `bound_steps` more steps add a hinge on the CROWN lower bound of every cell of
    # a partition of the box (verify/certified_loss.py), refined where the bound stays below the margin.
    bound_rounds: int = 3             # 0: sampling only (no verifier inside the repair)
    bound_steps: int = 200
    bound_cells: int = 1024           # initial cells; refined where the bound stays negative, up to 4×
    bound_weight: float = 0.1         # chosen on N2,1 φ2 (0.1: fidelity 98.9 %; 1: 97.5 %; 10: 95.2 %)
    bound_margin: float = 0.001
    bound_lr: float = 3e-5            # Adam moves every weight by ~lr a step whatever the loss weight: small steps
    verify_timeout: float = 20.0      # seconds per verifier call inside the repair
    seed: int = 0
    device: str = "cpu"


def decision_terms(z: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Per sample: the amount by which class y does not win the (argmax) decision logits z by `margin`."""
    others = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return torch.relu(others - z.gather(1, y[:, None]).squeeze(1) + margin)


def decision_hinge(z: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean amount by which class y does not win the (argmax) decision logits z by `margin`."""
    if not len(y):
        return z.sum() * 0
    return decision_terms(z, y, margin).mean()


def active_mean(terms, x: torch.Tensor, *rest: torch.Tensor, screen=None) -> torch.Tensor:
    """mean(terms(x, *rest)) with the graph built only through the samples whose hinge is active.

    A hinge term that is zero has zero gradient, so a pass without gradient over the whole batch, then a pass with
    gradient over the active samples only, gives the same value and the same gradient as one pass over all of them
    — at the cost of a forward pass instead of a forward and backward pass for the (many) inactive ones. That makes
    large fresh batches cheap, and batch size is what limits the keep term (its sampling noise moves the decisions).
    `screen(x, *rest)`: the same terms computed another way without gradient (`chain_forward`), for that first pass.
    """
    n = len(x)
    if n == 0:
        return x.new_zeros(())
    with torch.no_grad():
        active = (screen or terms)(x, *rest) > 0
    if not bool(active.any()):
        return terms(x[:1], *[r[:1] for r in rest]).sum() * 0          # zero, with a graph to the weights
    return terms(x[active], *[r[active] for r in rest]).sum() / n


@REPAIRERS.register("property_tune", "fine-tune the weights on fresh samples of a property's box (hinge: safe by a "
                                     "margin) and of the rest of the domain (hinge: keep the original decision)",
                    config=PropertyTuneConfig, needs=("property-region",))
def property_tune(model: nn.Module, defect: Defect, sites: Sites | None, cfg: PropertyTuneConfig) -> Edit:
    require_capability(defect, "property-region", "property_tune")
    require(cfg.steps >= 1 and cfg.box_batch >= 1 and cfg.keep_batch >= 1,
            "property_tune: steps, box_batch and keep_batch must be ≥ 1")
    require(cfg.lr > 0, f"property_tune: lr must be > 0, got {cfg.lr}")
    t0 = time.perf_counter()
    dev = cfg.device
    work = copy.deepcopy(model).to(dev).eval()
    x_ev, y_ev = defect.fit_counterexamples()
    x_ev, y_ev = x_ev.to(dev), y_ev.to(dev)
    params, masks = site_parameters(work, sites, x_ev[:1])
    names = {id(p): n for n, p in work.named_parameters()}
    params = params if params is not None else list(work.parameters())
    before = {names[id(p)]: p.detach().clone() for p in params}
    for p in work.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    masks = {p: m.to(p.device, p.dtype) for p, m in masks.items()} if masks else None
    frozen = {p: before[names[id(p)]] for p in masks} if masks else None
    g = torch.Generator().manual_seed(int(cfg.seed) + 777)      # repair-only stream
    last: dict = {}

    fast = chain_forward(work)
    net = fast or work

    def box_terms(x: torch.Tensor, f=work) -> torch.Tensor:
        return torch.relu(defect.property_margin(f(x)) + cfg.margin)

    def keep_terms(x: torch.Tensor, y: torch.Tensor, f=work) -> torch.Tensor:
        return decision_terms(defect.decision_logits(f(x)), y, cfg.keep_margin)

    def train(steps: int, cover=None) -> int:
        nonlocal last
        i = -1
        for i in range(steps):
            xb, xk, yk = defect.sample_fresh(cfg.box_batch, cfg.keep_batch, g)
            xb, xk, yk = xb.to(dev), xk.to(dev), yk.to(dev)
            box = active_mean(box_terms, xb, screen=lambda x: box_terms(x, net))
            keep = active_mean(keep_terms, xk, yk, screen=lambda x, y: keep_terms(x, y, net))
            ev = decision_hinge(defect.decision_logits(work(x_ev)), y_ev, 0.01)
            loss = cfg.box_weight * box + cfg.keep_weight * keep + cfg.evidence_weight * ev
            if cover is not None:
                v = cover.values(work)
                if bool((v > cfg.bound_margin).all()):     # every cell proved: stop changing the network
                    return i
                loss = loss + cfg.bound_weight * torch.relu(cfg.bound_margin - v).mean()
                if i % 50 == 49:
                    cover.refine(v.detach(), cfg.bound_margin)
            masked_step(opt, loss, masks, frozen)
            last = {"box_loss": box.item(), "keep_loss": keep.item(), "evidence_loss": ev.item()}
        return i + 1

    train(cfg.steps)
    rounds = _bound_rounds(work, defect, cfg, train, opt) if cfg.bound_rounds > 0 else []
    steps = cfg.steps + sum(r.get("steps", 0) for r in rounds)
    return Edit.between(before, work, {"repairer": "property_tune", "steps": steps, **last,
                                       "fresh_draws": steps * (cfg.box_batch + cfg.keep_batch),  # beyond the defect's
                                       "evidence": int(len(y_ev)), "bound_rounds": rounds,
                                       "seconds": time.perf_counter() - t0},
                        names=list(before))


def _bound_rounds(work: nn.Module, defect: Defect, cfg: PropertyTuneConfig, train, opt) -> list[dict]:
    """Verify; while not proved, train `bound_steps` more with the bound hinge. Returns what each round did."""
    from ..verify import verify
    from ..verify.certified_loss import BoxCover

    try:
        cover = BoxCover(defect.prop, cfg.bound_cells, 4 * cfg.bound_cells, cfg.device)
        cover.values(work)
    except NetmendError as e:                  # not a Linear/ReLU chain: sampling only
        return [{"skipped": first_line(e)}]
    rounds = []
    for r in range(cfg.bound_rounds + 1):
        work.eval()
        res = verify(work, defect.prop, timeout=cfg.verify_timeout, seed=int(cfg.seed) + 50 + r, device=cfg.device)
        rounds.append({"verify": res.status, "verify_seconds": round(res.seconds, 3)})
        if res.status == "verified" or r == cfg.bound_rounds:
            break
        t = time.perf_counter()
        cover.presplit(work, cfg.bound_margin)
        for group in opt.param_groups:
            group["lr"] = cfg.bound_lr
        done = train(cfg.bound_steps, cover)
        rounds[-1].update({"steps": done, "train_seconds": round(time.perf_counter() - t, 3),
                           "cells": int(len(cover.lo))})
    return rounds


METHODS.add("property-tune", MethodPreset(None, "property_tune", uses_pairs=False, defects=("safety",),
                                          paper="netmend (sampling-based property fine-tuning; not from the papers)"),
            "safety: fine-tune all weights on fresh box samples (safe by a margin) and fresh outside samples "
            "(original advisory kept)")
