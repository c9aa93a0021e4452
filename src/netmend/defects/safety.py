"""Safety-property defect (ACAS Xu): inside an input box the network's advisory must satisfy a condition.

Counterexamples are rare (φ8 on N2,9: 3.4·10⁻⁴ of the box; φ7 on N1,9: 4·10⁻⁷), so they are
*searched for*: the falsifier runs batched sign-PGD on the violation margin from many random starts,
then samples locally around what it found (clipped to the box). Seeds keep the sets apart:
  seed      -> evidence counterexamples + "drawndown" satisfying samples (the repair data)
  seed + 1  -> held-out counterexamples        (heldout_violation_rate)
  seed + 2  -> the metric falsifier run         (counterexamples_found)
  seed + 3  -> uniform box samples              (violation_rate)
  seed + 4  -> samples outside the box          (fidelity to the original network)
  seed + 5/6 -> outside-box keep samples of the objective (fit / validation)
  seed + 10 + r, seed + 100 + r -> round r of falsify → repair → falsify (`more_evidence`: PGD search and a
             uniform box sweep of the repair candidate, repair side only; never the metric seeds above)
netmend deviations from CARE's safety objective (fields of SafetyOptions): outside-box keep samples (`outside`),
a decision margin on the evidence (`objective_margin`), and counterexamples found on repair candidates during
falsify → repair rounds (`more_evidence`, `round_*`; PSOConfig.rounds). On the dev diagnostics (repair-only seeds)
N2,9 φ8 went from 198 uniform violations per 10⁶ and 4 falsifier hits to 0 and 0.
The ACAS advisory is the ARGMIN of the outputs; `Objective.decide` and `advisory` use it.

Properties (`--property`): a .vnnlib path; `prop_N` / `phiN` (prop_N.vnnlib under the data dir's
acasxu/vnnlib); or a built-in: `phi2-strengthened` (CARE's N3,3 property: in the φ1/φ2 box the
advisory must be COC). `box="care"` swaps in CARE's boxes (from CARE's code; φ8's ψ is twice as wide).
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.vnnlib import Property, argmin_property, check_network, load_vnnlib
from ..errors import NetmendError, require
from ..inference import chain_forward
from ..metrics import wilson_interval
from ..registry import DEFECTS
from .base import Defect, Objective, RepairData

PHI1_BOX = ([0.6, -0.5, -0.5, 0.45, -0.5], [0.679857769, 0.5, 0.5, 0.5, -0.45])
BUILTIN_PROPERTIES = {
    "phi2-strengthened": lambda: argmin_property("phi2-strengthened", [PHI1_BOX], [0]),
}
# CARE's normalised boxes (from CARE's code), keyed by property number / built-in name.
CARE_BOXES = {
    "8": ([-0.3284228772, -0.5, -0.031847133, -0.045454545, 0.0], [0.6798577687, -0.375, 0.031847133, 0.5, 0.5]),
    "7": ([-0.3284, -0.5, -0.5, -0.5, -0.5], [0.6799, 0.5, 0.5, 0.5, 0.5]),
    "phi2-strengthened": PHI1_BOX,
}


@dataclass
class SafetyOptions:
    """Which property, how hard to search for counterexamples, and how many samples each metric draws."""

    property: str = ""                 # .vnnlib path | prop_N | phiN | phi2-strengthened
    box: str = "official"              # official | care (CARE's boxes)
    seed: int = 0
    counterexamples: int = 1000        # evidence set size (CARE used 10 016)
    satisfying: int = 1000             # drawndown set size, fit + val (CARE used 10 016)
    val_fraction: float = 0.2
    heldout_counterexamples: int = 1000
    falsify_starts: int = 2048         # PGD random starts
    falsify_steps: int = 50
    falsify_step: float = 0.03         # initial step, as a fraction of the box width (cosine-decayed)
    local_radius: float = 0.02         # local sampling half-width, fraction of the box width
    local_rounds: int = 8
    falsify_snap: float = 0.5          # face-snapping probability per coordinate for half the starts
    eval_samples: int = 1_000_000      # uniform box samples for violation_rate
    eval_falsify_starts: int = 1024    # the metric falsifier's fixed budget (PGD starts, no local sampling)
    fidelity_samples: int = 100_000    # samples outside the box for fidelity
    # netmend deviation from CARE (docs/methods/care.md), measured in benchmarks/care.py: the objective's "keep" set also
    # holds `outside` samples from OUTSIDE the box (half over the whole domain, half in the near-box shell: the box
    # widened by its own width on each side), labelled with the original advisory, seed + 5 (validation: seed + 6).
    # CARE's objective (drawndown box samples only) is outside = 0; it left 97.2% / 84.7% fidelity outside the box.
    outside: int = 4000
    round_counterexamples: int = 250   # falsify→repair rounds (PSOConfig.rounds): counterexamples collected per round
                                       # on the candidate, searched with the repair-only seeds seed + 10 + round
    round_uniform: int = 1_000_000     # ... plus this many uniform box samples per round (seed + 100 + round); their
                                       # violations and local samples around them join the round's evidence
    objective_margin: float = 0.001    # the objective counts an evidence counterexample as violated until its margin
                                       # is below −objective_margin (output units; 0 = CARE's plain violation test):
                                       # repaired points are pushed past the decision boundary, not onto it
                                       # (drawndown samples' median margin: −0.0025 N2,9 φ8, −0.0014 N3,3 φ2s)
    device: str = "cpu"


def advisory(logits: torch.Tensor) -> torch.Tensor:
    """ACAS Xu's decision: the output with the LOWEST score."""
    return logits.argmin(-1)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    dev = _device(model)
    f = chain_forward(model) or model
    return torch.cat([f(x[i: i + chunk].to(dev)).cpu() for i in range(0, len(x), chunk)]) if len(x) else torch.zeros(0, 5)


@dataclass
class FalsifierResult:
    counterexamples: torch.Tensor      # (n, n_in), every one violates the property on the searched model
    starts_hit: int                    # PGD starts that reached a violation
    starts: int
    seconds: float


def _box_tensors(prop: Property, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([b[0] for b in prop.boxes]).to(device), torch.stack([b[1] for b in prop.boxes]).to(device))


def falsify(model: nn.Module, prop: Property, seed: int, starts: int = 2048, steps: int = 50, step: float = 0.05,
            want: int = 0, local_radius: float = 0.02, local_rounds: int = 8, snap: float = 0.5) -> FalsifierResult:
    """Batched sign-PGD maximising the violation margin from `starts` starts (half uniform in the box, half
    with coordinates snapped to the box faces), then (if want > 0)
    local uniform sampling around the counterexamples found until `want` are collected."""
    t0 = time.perf_counter()
    dev = _device(model)
    g = torch.Generator().manual_seed(int(seed))
    lo_all, hi_all = _box_tensors(prop, dev)
    x0 = prop.sample(starts, g).to(dev)
    which = _which_box(prop, x0)
    lo, hi = lo_all[which], hi_all[which]
    width = hi - lo
    if snap > 0:   # half the starts get each coordinate snapped to a face with prob. `snap` (ACAS cex sit on faces)
        s = torch.rand(starts, prop.n_inputs, generator=g).to(dev) < snap
        s[: starts // 2] = False
        side = (torch.rand(starts, prop.n_inputs, generator=g) < 0.5).to(dev)
        x0 = torch.where(s, torch.where(side, lo, hi), x0)
    x = x0.clone()
    best = torch.full((starts,), float("-inf"), device=dev)
    best_x = x0.clone()
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for t in range(steps + 1):
            x.requires_grad_(True)
            m = prop.margin(model(x))
            with torch.no_grad():
                hit = m.detach() >= 0
                better = hit & (m > best)
                best = torch.where(better, m.detach(), best)
                best_x[better] = x.detach()[better]
            if t == steps:
                break
            (gx,) = torch.autograd.grad(m.sum(), x)
            size = step * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / max(steps, 1)))) + 0.01 * step
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x + size * width * gx.sign(), lo), hi)
    finally:
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
        model.train(was_training)
    found = torch.isfinite(best)
    seeds, seed_box = best_x[found], which[found]
    n_hit = int(found.sum())
    with torch.no_grad():   # keep only points that violate under a plain forward (float noise)
        ok = prop.violated(model(seeds)) if len(seeds) else torch.zeros(0, dtype=torch.bool, device=dev)
    seeds, seed_box = seeds[ok], seed_box[ok]
    out = [seeds]
    total = len(seeds)
    pool, pool_box = seeds, seed_box
    for _ in range(local_rounds if want > total and len(seeds) else 0):
        n = max(4 * (want - total), 1024)
        pick = torch.randint(len(pool), (n,), generator=g).to(dev)
        w = (hi_all - lo_all)[pool_box[pick]]
        u = torch.rand(n, prop.n_inputs, generator=g).to(dev) * 2 - 1
        cand = torch.minimum(torch.maximum(pool[pick] + local_radius * w * u, lo_all[pool_box[pick]]), hi_all[pool_box[pick]])
        with torch.no_grad():
            v = prop.violated(model(cand))
        out.append(cand[v])
        total += int(v.sum())
        pool, pool_box = torch.cat([pool, cand[v]]), torch.cat([pool_box, pool_box[pick][v]])
        if total >= want:
            break
    cex = torch.cat(out)
    if want and len(cex) > want:   # all PGD endpoints first (diverse), then a random share of local samples
        k = len(seeds)
        if k >= want:
            cex = seeds[torch.randperm(k, generator=g)[:want].to(dev)]
        else:
            rest = cex[k:]
            cex = torch.cat([seeds, rest[torch.randperm(len(rest), generator=g)[: want - k].to(dev)]])
    return FalsifierResult(cex.detach().cpu(), n_hit, starts, time.perf_counter() - t0)


def _which_box(prop: Property, x: torch.Tensor) -> torch.Tensor:
    if len(prop.boxes) == 1:
        return torch.zeros(len(x), dtype=torch.long, device=x.device)
    inside = torch.stack([((x >= lo.to(x)) & (x <= hi.to(x))).all(-1) for lo, hi in prop.boxes], -1)
    return inside.float().argmax(-1)


def _domain(model_norm: dict | None, prop: Property) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's whole normalised input domain (from the .nnet min/max), else 3× the boxes' hull."""
    if model_norm and all(k in model_norm for k in ("input_min", "input_max", "input_mean", "input_range")):
        t = {k: torch.tensor(model_norm[k][: prop.n_inputs]) for k in ("input_min", "input_max", "input_mean", "input_range")}
        return (t["input_min"] - t["input_mean"]) / t["input_range"], (t["input_max"] - t["input_mean"]) / t["input_range"]
    lo, hi = _box_tensors(prop, "cpu")
    lo, hi = lo.amin(0), hi.amax(0)
    w = (hi - lo).clamp_min(1e-3)
    return lo - w, hi + w


class SafetyDefect(Defect):
    kind = "safety"
    decision = "argmin"

    def __init__(self, model: nn.Module, prop: Property, options: SafetyOptions | None = None,
                 normalisation: dict | None = None):
        o = options or SafetyOptions()
        require(o.counterexamples >= 1 and o.satisfying >= 2, "safety: need ≥ 1 counterexample and ≥ 2 satisfying samples")
        require(o.eval_samples >= 1 and o.fidelity_samples >= 1, "safety: sample counts must be positive")
        require(0 < o.val_fraction < 1, f"safety: val_fraction must be in (0, 1), got {o.val_fraction}")
        self.options, self.prop = o, prop
        self.num_classes, self.in_shape = prop.n_outputs, [prop.n_inputs]
        self.original = copy.deepcopy(model).to(o.device).eval()
        for p in self.original.parameters():
            p.requires_grad_(False)
        check_network(prop, self.original)       # the property's input and output counts are the network's
        self.normalisation = normalisation if normalisation is not None else getattr(model, "normalisation", None)
        fal = dict(starts=o.falsify_starts, steps=o.falsify_steps, step=o.falsify_step,
                   local_radius=o.local_radius, local_rounds=o.local_rounds, snap=o.falsify_snap)
        ev = falsify(self.original, prop, o.seed, want=o.counterexamples, **fal)
        self.falsifier_stats = {"starts_hit": ev.starts_hit, "starts": ev.starts, "found": len(ev.counterexamples),
                                "seconds": round(ev.seconds, 3)}
        self.x_bad = ev.counterexamples
        self.y_bad = self.safe_labels(self.x_bad)
        self.x_rounds: list[torch.Tensor] = []     # counterexamples found on repair candidates (more_evidence)
        ho = falsify(self.original, prop, o.seed + 1, want=o.heldout_counterexamples, **fal)
        self.x_heldout = ho.counterexamples
        self.drawndown_note = ""
        self.repair = self._drawndown(o.satisfying, o.val_fraction, o.seed, note=True)
        self._eval_x: torch.Tensor | None = None
        self._fid_x: torch.Tensor | None = None
        self._fid_y: torch.Tensor | None = None
        self.fidelity_region = ""

    # ------------------------------------------------------------ data
    def safe_labels(self, x: torch.Tensor) -> torch.Tensor:
        """For each counterexample, the allowed advisory the original network scores lowest (its own
        advisory where the property does not restrict the argmin)."""
        y = _outputs(self.original, x)
        k = self.prop.n_outputs
        probe = 1.0 - torch.eye(k)          # row c: an output vector whose argmin is c
        allowed = ~self.prop.violated(probe)
        if not allowed.any() or allowed.all() or len(x) == 0:
            return advisory(y) if len(x) else torch.zeros(0, dtype=torch.long)
        return advisory(torch.where(allowed, y, torch.full_like(y, float("inf"))))

    def _drawndown(self, n: int, val_fraction: float, seed: int, note: bool = False) -> RepairData:
        """Uniform box samples that satisfy the property on the original network, labelled with its advisory."""
        g = torch.Generator().manual_seed(int(seed) + 17)
        keep: list[torch.Tensor] = []
        got, drawn = 0, 0
        while got < n:
            x = self.prop.sample(max(2 * (n - got), 1024), g)
            drawn += len(x)
            ok = ~self.prop.violated(_outputs(self.original, x))
            keep.append(x[ok])
            got += int(ok.sum())
            if drawn > 200 * n and got < n:
                break
        x = torch.cat(keep)[:n]
        y = advisory(_outputs(self.original, x))
        if len(x) < n:
            # the network violates the property (almost) everywhere in the box: the rest are box samples labelled
            # with the allowed advisory the original network prefers (safe_labels), as its counterexamples are
            if note:
                self.drawndown_note = (f"only {len(x)} of {drawn} box samples satisfy the property; {n - len(x)} box "
                                       "samples labelled with their nearest allowed advisory fill the repair set")
            xs = self.prop.sample(n - len(x), g)
            x, y = torch.cat([x, xs]), torch.cat([y, self.safe_labels(xs)])
        n_val = max(1, int(round(val_fraction * n)))
        idx = list(range(n))
        return RepairData(x[n_val:], y[n_val:], x[:n_val], y[:n_val], {"fit": idx[n_val:], "val": idx[:n_val]})

    def evidence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counterexamples found with the repair seed, labelled with the allowed advisory the original net prefers."""
        if len(self.x_bad) == 0:
            raise NetmendError(f"no counterexample to property {self.prop.name} found within the falsifier budget "
                               f"({self.options.falsify_starts} starts × {self.options.falsify_steps} steps); nothing to repair")
        return self.x_bad, self.y_bad

    def advisory(self, logits: torch.Tensor) -> torch.Tensor:
        return advisory(logits)

    # ------------------------------------------------------------ repair interface
    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample violation margin (differentiable; ≥ 0 iff the property is violated)."""
        return self.prop.margin(model(x))

    def outside_samples(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n inputs outside the box(es) — half uniform over the domain, half in the near-box shell — with the
        original network's advisories. Never the metric's points (seed + 4)."""
        if n <= 0:
            return torch.zeros(0, self.prop.n_inputs), torch.zeros(0, dtype=torch.long)
        g = torch.Generator().manual_seed(int(seed))
        dlo, dhi = self.domain()
        blo, bhi = _box_tensors(self.prop, "cpu")
        blo, bhi = blo.amin(0), bhi.amax(0)
        w = (bhi - blo).clamp_min(1e-3)
        regions = [(dlo, dhi), (torch.maximum(blo - w, dlo), torch.minimum(bhi + w, dhi))]
        out = []
        for k, (lo, hi) in enumerate(regions):
            want, got, tries = n // 2 + (n % 2 if k == 0 else 0), [], 0
            while sum(len(t) for t in got) < want and tries < 100:
                got.append(self._draw_outside(lo, hi, 4 * want + 16, g))
                tries += 1
            out.append(torch.cat(got)[:want])
        x = torch.cat(out)
        return x, advisory(_outputs(self.original, x))

    def _draw_outside(self, lo: torch.Tensor, hi: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        """Of n uniform draws in [lo, hi], those outside the property's box(es)."""
        x = lo + torch.rand(n, len(lo), generator=g) * (hi - lo)
        return x[~self.prop.in_box(x)]

    def sample_fresh(self, n_box: int, n_keep: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fresh draw for sampling repairers (repair/property_tune.py), from the caller's repair-only stream:
        `n_box` points of the box(es), and the points of `n_keep` uniform domain draws that lie outside them —
        the fidelity metric's region (where the box covers the domain, as for φ7: satisfying in-box points
        instead, as `_fidelity_points`) — with the original network's advisories."""
        keep = self._draw_outside(*self.domain(), n_keep, g)
        if len(keep) < max(1, n_keep // 100):
            xb = self.prop.sample(n_keep, g)
            keep = xb[~self.prop.violated(_outputs(self.original, xb))]
        return self.prop.sample(n_box, g), keep, advisory(_outputs(self.original, keep))

    def domain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's whole normalised input domain (from the .nnet min/max), else 3× the boxes' hull."""
        return _domain(self.normalisation, self.prop)

    def property_margin(self, outputs: torch.Tensor) -> torch.Tensor:
        """Differentiable: ≥ 0 where the outputs violate the property."""
        return self.prop.margin(outputs)

    def fit_counterexamples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evidence counterexamples of the fit split, with the advisory each should take (`safe_labels`)."""
        x = self._split_bad()[0] if self.options.outside > 0 else torch.cat([self.evidence()[0]] + self.x_rounds)
        return x, self.safe_labels(x)

    def _split_bad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Evidence counterexamples split fit / validation (val_fraction, when there are ≥ 5 of them); each
        round's counterexamples (more_evidence) are split the same way and appended."""
        fits, vals = [], []
        for x_bad in [self.evidence()[0]] + self.x_rounds:
            n_val = int(round(self.options.val_fraction * len(x_bad))) if len(x_bad) >= 5 else 0
            fits.append(x_bad[n_val:])
            vals.append(x_bad[:n_val] if n_val else x_bad)
        return torch.cat(fits), torch.cat(vals)

    def add_counterexamples(self, x: torch.Tensor) -> int:
        """Inputs of the box found unsafe on a repair candidate (e.g. by the verifier) join the evidence the next
        repair fits (appended after the validation part, so they are fitted); returns how many were in the box."""
        x = x.to(self.x_bad.dtype).reshape(-1, self.prop.n_inputs)
        x = x[self.prop.in_box(x)]
        if len(x):
            self.x_bad = torch.cat([self.x_bad, x])
            self.y_bad = self.safe_labels(self.x_bad)
        return int(len(x))

    def clear_rounds(self) -> None:
        self.x_rounds = []

    def more_evidence(self, model: nn.Module, round: int) -> int:
        """Falsify a repair candidate with the repair-only seed seed + 10 + round (same PGD budget as the
        evidence search, plus local sampling up to `round_counterexamples`); what it finds joins the evidence
        of later objectives. Returns how many were added (0: the candidate resisted this search)."""
        o = self.options
        if o.round_counterexamples <= 0:
            return 0
        model = copy.deepcopy(model).to(o.device).eval()
        found = falsify(model, self.prop, o.seed + 10 + round, starts=o.falsify_starts, steps=o.falsify_steps,
                        step=o.falsify_step, want=o.round_counterexamples, local_radius=o.local_radius,
                        local_rounds=o.local_rounds, snap=o.falsify_snap).counterexamples
        if o.round_uniform > 0:
            g = torch.Generator().manual_seed(o.seed + 100 + round)
            x = self.prop.sample(o.round_uniform, g)
            v = x[self.prop.violated(_outputs(model, x))]
            if len(v):      # rare isolated violations: sample around them too (clipped to the box)
                lo, hi = _box_tensors(self.prop, "cpu")
                lo, hi = lo.amin(0), hi.amax(0)
                pool = v
                for _ in range(o.local_rounds):
                    c = pool[torch.randint(len(pool), (1024,), generator=g)]
                    c = torch.minimum(torch.maximum(c + o.local_radius * (hi - lo) * (2 * torch.rand(c.shape, generator=g) - 1), lo), hi)
                    c = c[self.prop.in_box(c) & self.prop.violated(_outputs(model, c))]
                    pool = torch.cat([pool, c])
                    if len(pool) >= o.round_counterexamples:
                        break
                keep = torch.randperm(len(pool), generator=g)[: o.round_counterexamples]
                found = torch.cat([found, pool[keep]])
        if len(found):
            self.x_rounds.append(found)
        return len(found)

    def _violated_obj(self, y: torch.Tensor) -> torch.Tensor:
        d = self.options.objective_margin
        return self.prop.violated(y) | (self.prop.margin(y) >= -d) if d > 0 else self.prop.violated(y)

    def objective(self, model: nn.Module) -> Objective:
        """CARE's safety fitness: violation rate on the evidence counterexamples (fit part), agreement (argmin)
        with the original advisories on the drawndown fit samples plus `outside` samples outside the box."""
        x_bad, _ = self._split_bad() if self.options.outside > 0 else (torch.cat([self.evidence()[0]] + self.x_rounds), None)
        xo, yo = self.outside_samples(self.options.outside, self.options.seed + 5)
        return Objective(x_bad, self._violated_obj, torch.cat([self.repair.x_fit, xo]), torch.cat([self.repair.y_fit, yo]),
                         decide=advisory)

    def validation_objective(self, model: nn.Module) -> Objective:
        """The same cost on held-apart data: validation counterexamples, drawndown validation samples and fresh
        outside-box samples (seed + 6). Repairers use it to choose among candidates, never to fit."""
        _, x_bad = self._split_bad()
        xo, yo = self.outside_samples(self.options.outside // 2, self.options.seed + 6)
        return Objective(x_bad, self._violated_obj, torch.cat([self.repair.x_val, xo]), torch.cat([self.repair.y_val, yo]),
                         decide=advisory)

    gate_must_clear = True    # a safety repair that leaves a counterexample the falsifier finds is no repair

    def gate_check(self, model: nn.Module) -> dict[str, Any]:
        """Fidelity (original advisory kept) on fresh uniform samples of the domain outside the box — the fidelity
        metric's quantity, on the gate's own seed; inside the box a repair may move an advisory between the ones
        the property allows — and the counterexamples a fresh falsifier run (its own seed, never used by a repair)
        finds in the box. Where the box covers (almost) the whole domain, the validation drawndown samples."""
        o = self.options
        g = torch.Generator().manual_seed(o.seed + 8)
        lo, hi = self.domain()
        n = 20000
        xo = self._draw_outside(lo, hi, 2 * n, g)[:n]
        if len(xo) >= n // 100:
            yo = advisory(_outputs(self.original, xo))
        else:
            xo, yo = self.repair.x_val, self.repair.y_val
        was = model.training
        model.eval()
        with torch.no_grad():
            fid = float((advisory(_outputs(model, xo)) == yo).float().mean())
        fal = falsify(model, self.prop, o.seed + 7919, starts=o.eval_falsify_starts, steps=o.falsify_steps,
                      step=o.falsify_step, want=0, snap=o.falsify_snap)
        model.train(was)
        return {"accuracy": fid, "accuracy_name": "fidelity on fresh samples outside the box",
                "accuracy_samples": int(len(yo)),
                "defect": float(fal.starts_hit), "defect_name": "falsifier counterexamples (fresh run)",
                "defect_unit": "count"}

    def tuning_set(self, use_pairs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient repairers fit the objective's data: the keep rows with the original advisories and (with
        `use_pairs`) the fit counterexamples with the allowed advisory the original network scores lowest."""
        obj = self.objective(self.original)
        if not use_pairs:
            return obj.x_good, obj.y_good
        return torch.cat([obj.x_good, obj.x_bad]), torch.cat([obj.y_good, self.safe_labels(obj.x_bad)])

    def validation_score(self, model: nn.Module) -> float:
        """Share of the drawndown validation samples whose advisory is unchanged (argmin, not argmax)."""
        return float((advisory(_outputs(model, self.repair.x_val)) == self.repair.y_val).float().mean())

    def samples_used(self, uses_pairs: bool = True) -> int:
        return len(self.repair) + (len(self.x_bad) if uses_pairs else 0)

    # ------------------------------------------------------------ metrics
    def _eval_points(self) -> torch.Tensor:
        if self._eval_x is None:
            self._eval_x = self.prop.sample(self.options.eval_samples, torch.Generator().manual_seed(self.options.seed + 3))
        return self._eval_x

    def _fidelity_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs outside the box(es); where the box covers (almost) the whole domain (φ7), fresh satisfying
        in-box samples instead (`fidelity_region` says which)."""
        if self._fid_x is None:
            g = torch.Generator().manual_seed(self.options.seed + 4)
            lo, hi = self.domain()
            n = self.options.fidelity_samples
            x = self._draw_outside(lo, hi, n, g)
            if len(x) >= max(1, n // 100):
                while len(x) < n:
                    x = torch.cat([x, self._draw_outside(lo, hi, 2 * (n - len(x)) * n // len(x) + 16, g)])
                self._fid_x, self.fidelity_region = x[:n], "outside-box"
            else:
                rd = self._drawndown(n, 0.5, self.options.seed + 4)
                x = torch.cat([rd.x_fit, rd.x_val])
                self._fid_x = x[~self.prop.violated(_outputs(self.original, x))]
                self.fidelity_region = "inside-box-satisfying"
            self._fid_y = advisory(_outputs(self.original, self._fid_x))
        return self._fid_x, self._fid_y

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        o = self.options
        was_training = model.training
        model.eval()
        x = self._eval_points()
        k = int(sum(int(self.prop.violated(_outputs(model, x[i: i + (1 << 17)])).sum()) for i in range(0, len(x), 1 << 17)))
        lo, hi = wilson_interval(k, len(x))
        fal = falsify(model, self.prop, o.seed + 2, starts=o.eval_falsify_starts, steps=o.falsify_steps,
                      step=o.falsify_step, want=0, snap=o.falsify_snap)
        held = float(self.prop.violated(_outputs(model, self.x_heldout)).float().mean()) if len(self.x_heldout) else float("nan")
        fx, fy = self._fidelity_points()
        fidelity = float((advisory(_outputs(model, fx)) == fy).float().mean())
        model.train(was_training)
        return {
            "violation_rate": k / len(x), "violation_rate_ci": [lo, hi], "violation_samples": len(x),
            "counterexamples_found": fal.starts_hit, "falsifier_starts": fal.starts,
            "heldout_violation_rate": held, "heldout_counterexamples": len(self.x_heldout),
            "fidelity": fidelity, "fidelity_samples": len(fx), "fidelity_region": self.fidelity_region,
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"property": self.prop.describe(), "box": self.options.box, "evidence": len(self.x_bad),
                  "round_counterexamples": [len(x) for x in self.x_rounds],
                  "heldout_counterexamples": len(self.x_heldout), "falsifier": self.falsifier_stats,
                  **({"repair_set": self.drawndown_note} if self.drawndown_note else {}),
                  "seeds": {"repair": self.options.seed, "heldout": self.options.seed + 1, "falsifier_metric": self.options.seed + 2,
                            "violation_rate": self.options.seed + 3, "fidelity": self.options.seed + 4}})
        return d


# ---------------------------------------------------------------- building from a model's info

def resolve_property(spec: str, box: str = "official", data_dir=None) -> Property:
    """A property from a .vnnlib path, `prop_N`/`phiN` (data dir), or a built-in name; `box` picks the variant."""
    require(bool(spec), "the safety defect needs a property: --property FILE.vnnlib (or phi2-strengthened)")
    require(box in ("official", "care"), f"--box must be official or care, got {box!r}")
    key = None
    if spec in BUILTIN_PROPERTIES:
        prop, key = BUILTIN_PROPERTIES[spec](), spec
    elif Path(spec).expanduser().is_file() or spec.endswith(".vnnlib"):
        prop = load_vnnlib(Path(spec).expanduser())
    else:
        m = re.fullmatch(r"(?:prop_?|phi|φ)?(\d+)", spec)
        if not m:
            raise NetmendError(f"unknown property {spec!r}: give a .vnnlib file, prop_N, or one of {sorted(BUILTIN_PROPERTIES)}")
        from ..data.datasets import find_file, resolve_data_dir

        name = f"prop_{m.group(1)}.vnnlib"
        prop = load_vnnlib(find_file(resolve_data_dir(data_dir), [f"acasxu/vnnlib/{name}", f"vnnlib/{name}", name], name))
    if key is None:
        m = re.fullmatch(r"prop_(\d+)", prop.name)
        key = m.group(1) if m else prop.name
    prop.meta["box"] = box
    if box == "care":
        if key not in CARE_BOXES:
            raise NetmendError(f"no CARE box for property {prop.name}; CARE boxes exist for {sorted(CARE_BOXES)}")
        lo, hi = CARE_BOXES[key]
        prop = Property(prop.name, [(torch.tensor(lo), torch.tensor(hi))], prop.unsafe, prop.n_inputs, prop.n_outputs,
                        prop.source, {**prop.meta, "box": "care"})
    return prop


def _load_source(info: dict) -> nn.Module:
    from ..registry import MODEL_FILES
    from ..modelio import load_model_folder

    src = info.get("source")
    require(bool(src), "the safety defect needs the network: pass model=..., or an info with 'source'")
    p = Path(src)
    if p.is_dir():
        return load_model_folder(p)[0]
    return MODEL_FILES.get(p.suffix.lower())(p)[0]


@DEFECTS.register("safety", "a safety property (VNN-LIB box + output condition) is violated inside its input box",
                  config=SafetyOptions, needs_model=True)
def safety_from_info(info: dict, options: SafetyOptions, data_dir=None, model: nn.Module | None = None) -> SafetyDefect:
    """The network (given, or reloaded from info['source']) plus --property (or info['defect']['property'])."""
    d = info.get("defect", {})
    spec = options.property or d.get("property", "")
    if not options.property and d.get("box") and options.box == "official":
        options.box = d["box"]
    prop = resolve_property(spec, options.box, data_dir)
    net = model if model is not None else _load_source(info)
    check_network(prop, net, (info.get("arch_args") or {}).get("in_shape"))   # before anything is sampled
    norm = dict(info.get("arch_args", {}))
    norm = {k: v for k, v in norm.items() if k.startswith(("input_", "output_"))} or getattr(net, "normalisation", None)
    return SafetyDefect(net, prop, options, norm)
