"""CARE's causal fault localisation (Sun et al., ICSE 2022; docs/methods/care.md).

Every neuron h_i of the chosen layers (a Linear unit or a conv channel) is intervened on,
do(h_i = v), for S evenly spaced values v in its observed range; the mean of a per-task output y
under each intervention gives a curve per neuron, scored by its range (backdoor, safety) or mean
(fairness). Why batched: CARE's code loops over neurons and values; here the prefix activations
are cached once and (neuron, value) pairs × inputs run through the suffix in a few big passes.

Deviation for backdoors on CNNs (`cnn_layer`, `keep`): CARE intervenes on one dense layer and keeps 5 neurons.
netmend's backdoor default is the *flattened conv features* feeding the first Linear (one neuron per channel ×
position, e.g. small-cnn's `flatten`, 64×7×7) and keeps 30. A BadNets patch lives at a few positions of many
channels: those features rank first (the trigger's corner position) and scaling them leaves clean images
almost untouched, whereas the head's 128 hidden units each mix trigger and class evidence (measured on dev
models, seed-1 FMNIST and seed-7 MNIST-5k: head units 5 → 81.8 / 72.0% validation accuracy at 3.1 / 0% ASR;
30 features → 91.5 / 96.0% at 0 / 0%, from 92.5 / 96.0%). `cnn_layer='head'`, `keep=5` restore CARE.

Safety probe data (`box_only`): CARE takes the expectation over the drawndown box samples. netmend's default takes
it over the objective's keep set, which also holds outside-box samples (SafetyOptions.outside), so neurons are
ranked by their effect over the whole domain; `box_only=True` restores CARE's data (used for N3,3 φ2s in
benchmarks/care.py, where it kept more fidelity outside the box on the repair-side diagnostics).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..defects.base import Defect
from ..defects.capabilities import Counterfactual, PropertyRegion
from ..errors import NetmendError, require
from ..hooks import (Split, get_layer, leaf_modules, replace_output, split_at, split_sequential, unsplittable,
                     weight_layers)
from ..registry import LOCALISERS, Registry
from ..sites import Site, Sites

PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)


# ----------------------------------------------------------------------------- cutting a model

def default_layers(model: nn.Module, cnn_layer: str = "head") -> list[str]:
    """Default layers: CNN → the input of the classifier head (the module just before it), or with
    cnn_layer='features' the input of the first Linear (the flattened conv features);
    MLP → every hidden activation module feeding a Linear (ranked jointly)."""
    require(cnn_layer in ("head", "features"), f"causal: unknown cnn_layer {cnn_layer!r} (head | features)")
    heads = weight_layers(model)
    require(len(heads) > 0, "the model has no Linear or Conv2d layer to localise in")
    leaves = leaf_modules(model)
    names = [n for n, _ in leaves]
    head = heads[-1]
    if any(isinstance(m, nn.Conv2d) for _, m in leaves):
        if cnn_layer == "features":
            first = next((n for n in heads if isinstance(get_layer(model, n), nn.Linear)), head)
            i = names.index(first)
            require(i > 0, f"nothing feeds the first Linear {first!r}")
            return [names[i - 1]]
        i = names.index(head)
        require(i > 0, f"nothing feeds the classifier head {head!r}")
        return [names[i - 1]]
    acts = [n for n, m in leaves[: names.index(head)]
            if not isinstance(m, (nn.Linear, nn.Conv2d) + PASS_THROUGH) and "norm" not in n.split(".")[-1]
            and names.index(n) > names.index(heads[0])]
    return acts or heads[:-1] or [head]


class Cut:
    """A model cut after `layer`: `prefix(x)` gives the layer's output, `suffix(h, x)` the logits.

    Top-level Sequential models are split into two Sequentials (exactly as before); any other model is cut by
    torch.fx (`hooks.split_at`, in `graph`): its prefix also returns the values a skip connection carries across
    the cut (`prefix(x, carried=True)` → (h, carried)), which `suffix(h, carried=...)` takes back, tiled when h
    holds k copies of the rows (k·N rows, copy-major). Only when torch.fx cannot cut the model (`reason` says
    why, logged once) does the suffix run the whole model with the layer's output replaced, which needs the
    matching inputs `x`."""

    def __init__(self, model: nn.Module, layer: str):
        get_layer(model, layer)
        self.model, self.layer = model, layer
        self.split = split_sequential(model, layer)
        self.graph: Split | None = None
        self.reason: str | None = None
        if self.split is None:
            self.graph, self.reason = split_at(model, layer)

    @property
    def cuts(self) -> bool:
        """True when the suffix runs without recomputing the prefix (a Sequential or a torch.fx cut)."""
        return self.split is not None or self.graph is not None

    @property
    def carries(self) -> bool:
        """True when the suffix needs values besides h (a skip connection crosses the cut)."""
        return self.graph is not None and bool(self.graph.carried)

    def after(self, name: str) -> bool:
        """Whether the module `name` runs in the suffix (for a Sequential: assumed, registration = run order)."""
        if self.graph is not None:
            return name in self.graph.suffix_layers
        return self.split is not None

    def _check(self, x: torch.Tensor) -> None:
        if self.graph is not None and not self.graph.verified and len(x):
            why = self.graph.verify(self.model, x)
            if why:
                unsplittable(self.model, self.layer, why)
                self.graph, self.reason = None, why

    @torch.no_grad()
    def prefix(self, x: torch.Tensor, batch: int = 4096, carried: bool = False):
        """The layer's output for x (batched); with carried=True, (h, carried values) — () unless a skip
        connection crosses a torch.fx cut."""
        from ..hooks import run_to

        self._check(x)
        if self.graph is not None:
            parts = [self.graph.run_prefix(x[i: i + batch]) for i in range(0, max(len(x), 1), batch)]
            h = torch.cat([p[0] for p in parts])
            carry = tuple(torch.cat([p[1][j] for p in parts]) for j in range(len(self.graph.carried)))
            return (h, carry) if carried else h
        run = self.split[0] if self.split is not None else (lambda xb: run_to(self.model, self.layer, xb))
        h = torch.cat([run(x[i: i + batch]) for i in range(0, len(x), batch)])
        return (h, ()) if carried else h

    def carry(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The values the suffix needs besides h for inputs x (() when none)."""
        return self.prefix(x, carried=True)[1] if self.carries else ()

    def suffix(self, h: torch.Tensor, x: torch.Tensor | None = None,
               carried: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if self.split is not None:
            return self.split[1](h)
        if self.graph is not None and self.graph.carried and carried is None:
            require(x is not None, f"the cut at {self.layer!r} carries {', '.join(self.graph.carried)} across: "
                                   "pass the matching inputs x or their carried values")
            carried = self.carry(x)
        if self.graph is not None:
            return self.graph.run_suffix(h, carried or ())
        require(x is not None and len(x) == len(h), "cutting a non-Sequential model needs the matching inputs")
        with replace_output(self.model, self.layer, lambda _out: h):
            return self.model(x)

    def suffix_modules(self) -> list[nn.Module] | None:
        """The suffix as a list of one-input modules (the Sequential's children, or a torch.fx cut's straight
        chain of module / flatten / relu calls taking h only), else None."""
        if self.split is not None:
            return list(self.split[1].children())
        return self.graph.chain if self.graph is not None else None

    def first_linear(self) -> tuple[nn.Linear, nn.Module] | None:
        """(Linear, rest of the suffix) when the suffix starts with a Linear (after pass-through modules)."""
        mods = self.suffix_modules()
        if mods is None:
            return None
        i = 0
        while i < len(mods) and isinstance(mods[i], PASS_THROUGH):
            i += 1
        if i < len(mods) and isinstance(mods[i], nn.Linear):
            return mods[i], nn.Sequential(*mods[i + 1:])
        return None


def unique_rows(h: torch.Tensor, carried: tuple[torch.Tensor, ...] = ()):
    """(distinct rows of h, their carried values, inverse) when fewer than 95 % of the rows of (h, carried) are
    distinct, else None. Identical rows stay identical under any intervention on h: run each once, gather back."""
    n = len(h)
    if not carried:
        uniq, inv = torch.unique(h.reshape(n, -1), dim=0, return_inverse=True)
        if len(uniq) < 0.95 * n:
            return uniq.reshape(len(uniq), *h.shape[1:]), (), inv
        return None
    key = torch.cat([t.reshape(n, -1).double() for t in (h, *carried)], 1)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    if len(uniq) >= 0.95 * n:
        return None
    first = torch.empty(len(uniq), dtype=torch.long, device=h.device).scatter_(0, inv, torch.arange(n, device=h.device))
    return h[first], tuple(c[first] for c in carried), inv


# ----------------------------------------------------------------------------- per-kind outputs

@dataclass
class Probe:
    """What to intervene on and how to read the result.

    x: rows run under every intervention; x_range: extra rows that only widen [lo, hi];
    reduce: logits (B, len(x), K) → (B, C) curve values, one column per output curve."""

    x: torch.Tensor
    x_range: torch.Tensor
    reduce: Callable[[torch.Tensor], torch.Tensor]
    curves: list[str] = field(default_factory=lambda: ["y"])
    x_keep: torch.Tensor | None = None    # rows whose behaviour must not change (CausalConfig.specific)


@dataclass
class CausalOutput:
    probe: Callable[[nn.Module, Defect, "CausalConfig"], Probe]
    steps: int = 4
    keep: int = 5
    score: str = "range"          # range | mean of the curve over v
    cnn_layer: str = "head"       # CNN default layer: head (CARE) | features (input of the first Linear)
    inputs: bool = False          # rank the input features too, where a module feeds the first weight layer


CAUSAL_OUTPUTS: Registry[CausalOutput] = Registry("causal output")


def _sample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n <= 0 or len(x) <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:n].sort().values]


def _backdoor_probe(model, defect, cfg) -> Probe:
    """Mean target-class softmax on clean repair images; their triggered copies only widen the range."""
    x = _sample(defect.repair.x_fit, cfg.samples, cfg.seed + 123)
    t = int(defect.target)
    return Probe(x, defect.stamp(x), lambda z: torch.softmax(z, -1)[..., t].mean(-1, keepdim=True), [f"p_{t}"])


def _safety_probe(model, defect, cfg) -> Probe:
    """Mean COC / WL scores on property-satisfying box samples; counterexamples only widen the range."""
    obj = defect.objective(model)
    outs = list(cfg.outputs) if cfg.outputs is not None else [0, 1]
    rep = defect.repair
    # the drawndown box samples only (CARE): the objective's keep set also holds outside-box samples
    # (SafetyOptions.outside), which would rank neurons by their effect over the whole domain
    pool = rep.x_fit if (cfg.box_only and rep is not None and len(rep.x_fit)) else obj.x_good
    x = _sample(pool, cfg.samples, cfg.seed + 123)
    idx = torch.tensor(outs)
    keep = obj.x_good[~defect.prop.in_box(obj.x_good)] if cfg.specific and isinstance(defect, PropertyRegion) else None
    return Probe(x, obj.x_bad, lambda z: z[..., idx.to(z.device)].mean(-2), [f"score_{o}" for o in outs], keep)


def _generic_probe(model, defect, cfg) -> Probe:
    """Any defect with an objective: the violation rate on its evidence under each intervention."""
    obj = defect.objective(model)
    return Probe(obj.x_bad, obj.x_good, lambda z: obj.violated(z).float().mean(-1, keepdim=True), ["violation"])


def fairness_flips(defect: Defect, x: torch.Tensor) -> torch.Tensor:
    """(N, F, D) copies of x with the protected attribute(s) set to each other value (x itself where
    an alternative equals its own value). Uses the defect's own flip method."""
    if not isinstance(defect, Counterfactual):
        raise NetmendError(f"the fairness causal output flips protected attributes; a {defect.kind} defect has none")
    return defect.flip(x)


def _fairness_probe(model, defect, cfg) -> Probe:
    """CARE's fairness output dy(v) = mean_x max_{a'} |p0(x[A←a']) − p0(x)| under do(h=v) on both copies, over
    discriminatory instances of the repair data (the objective's evidence)."""
    defect.objective(model)                            # binds model-dependent evidence (the DI set)
    x = _sample(defect.evidence()[0], cfg.samples, cfg.seed + 123)
    flips = fairness_flips(defect, x)                  # (N, F, D)
    n, f = flips.shape[:2]
    rows = torch.cat([x, flips.reshape(n * f, *x.shape[1:])])

    def reduce(z: torch.Tensor) -> torch.Tensor:
        p0 = torch.softmax(z, -1)[..., 0]
        base, alt = p0[..., :n], p0[..., n:].reshape(*p0.shape[:-1], n, f)
        return (alt - base.unsqueeze(-1)).abs().amax(-1).mean(-1, keepdim=True)

    return Probe(rows, x, reduce, ["dy"])


CAUSAL_OUTPUTS.add("backdoor", CausalOutput(_backdoor_probe, steps=4, keep=30, score="range", cnn_layer="features"),
                   "mean target-class softmax on clean repair images")
CAUSAL_OUTPUTS.add("safety", CausalOutput(_safety_probe, steps=4, keep=27, score="range"),
                   "mean COC and WL scores on satisfying box samples")
# Fairness departs from CARE (keep 3, hidden units only, mean score): chosen on the Census / Credit / Bank dev models
# (benchmarks/care.py) — with CARE's settings the test-split discrimination fell 9–49 %; the protected attribute's
# own input feature is the most direct site, and ranking by how far an intervention can lower the curve finds it.
CAUSAL_OUTPUTS.add("fairness", CausalOutput(_fairness_probe, steps=16, keep=13, score="drop", inputs=True),
                   "mean max |Δp0| between an instance and its protected-attribute flips")
CAUSAL_OUTPUTS.add("generic", CausalOutput(_generic_probe, steps=4, keep=5, score="range"),
                   "violation rate of the defect objective's evidence")


def output_for(kind: str) -> CausalOutput:
    return CAUSAL_OUTPUTS.get(kind if kind in CAUSAL_OUTPUTS else "generic")


def causal_defaults(defect: Defect, cfg: "CausalConfig") -> dict:
    """The causal output named for the defect's kind (`generic` for kinds without their own) and that output's
    steps, keep, score and CNN layer. `inputs` stays None: rank the input features where the model allows it."""
    name = cfg.output or (defect.kind if defect.kind in CAUSAL_OUTPUTS else "generic")
    spec = CAUSAL_OUTPUTS.get(name)
    return {"output": name, "steps": spec.steps, "keep": spec.keep, "score": spec.score, "cnn_layer": spec.cnn_layer}


# ----------------------------------------------------------------------------- interventions

def neuron_ranges(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron [lo, hi] over samples (and spatial positions for conv channels)."""
    flat = h.transpose(0, 1).reshape(h.shape[1], -1)
    return flat.min(1).values, flat.max(1).values


def _set_neuron(h: torch.Tensor, units: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """B intervened copies of h (N, U, ...): copy b has neuron units[b] set to values[b]."""
    b = len(units)
    hc = h.unsqueeze(0).repeat(b, *([1] * h.dim()))
    ar = torch.arange(b, device=h.device)
    hc[ar, :, units] = values.view(b, *([1] * (h.dim() - 1))).to(h.dtype)
    return hc


@torch.no_grad()
def intervention_curves(cut: Cut, h: torch.Tensor, values: torch.Tensor, reduce, x: torch.Tensor | None = None,
                        max_elems: int = 1 << 24, dedupe: bool = True,
                        carried: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Curves (U, S, C): reduce(logits under do(h_u = values[u, s])), all pairs batched.

    When the suffix starts with a Linear on flat units the intervention is a rank-one change of its
    pre-activation, z = z0 + W[:, u]·(v − h_u), so the U-wide copies are never built. A torch.fx cut with a
    skip connection across it takes the carried values of the rows of h (`carried`, else computed from x)."""
    n_all, u = h.shape[0], h.shape[1]
    s = values.shape[1]
    carry: tuple[torch.Tensor, ...] = ()
    if cut.carries:
        require(carried is not None or x is not None, f"the cut at {cut.layer!r} carries values across: pass x")
        carry = tuple(carried) if carried is not None else cut.carry(x)
    inv = None
    if dedupe and cut.cuts and n_all > 1:
        # Identical rows of h stay identical under every do(h_u = v): run each distinct row once, gather back.
        found = unique_rows(h, carry)
        if found is not None:
            h, carry, inv = found
    n = h.shape[0]
    units = torch.arange(u, device=h.device).repeat_interleave(s)
    vals = values.reshape(-1)
    fast = cut.first_linear() if h.dim() == 2 else None
    if fast is not None:
        lin, rest = fast
        z0 = lin(h)
        width = z0.shape[1]
        wt = lin.weight.T                                                   # (U, K)
    else:
        width = max(h[0].numel(), 1) + sum(c[0].numel() for c in carry)
    chunk = max(1, max_elems // (n * width))
    out = []
    for i in range(0, len(units), chunk):
        uu, vv = units[i: i + chunk], vals[i: i + chunk]
        b = len(uu)
        if fast is not None:
            delta = vv[:, None] - h[:, uu].T                        # (b, N)
            z = torch.addcmul(z0.unsqueeze(0), delta.unsqueeze(-1), wt[uu].unsqueeze(1))
            logits = rest(z.reshape(b * n, width))
        elif cut.cuts:
            hc = _set_neuron(h, uu, vv)
            logits = cut.suffix(hc.reshape(b * n, *h.shape[1:]), carried=carry)
        else:
            hc = _set_neuron(h, uu, vv)
            xr = x.repeat(b, *([1] * (x.dim() - 1))) if x is not None else None
            logits = cut.suffix(hc.reshape(b * n, *h.shape[1:]), xr)
        logits = logits.reshape(b, n, -1)
        out.append(reduce(logits[:, inv] if inv is not None else logits))
    return torch.cat(out).reshape(u, s, -1)


@torch.no_grad()
def intervention_curves_model_loop(model: nn.Module, layer: str, x: torch.Tensor, values: torch.Tensor,
                                   reduce) -> torch.Tensor:
    """CARE's reference code: for every neuron and every value, one whole-model forward pass on x with a
    hook that overwrites that neuron. No cached prefix, no batching. Speed benchmark / tests only."""
    from ..hooks import replace_output

    u, s = values.shape
    rows = []
    for j in range(u):
        for k in range(s):
            def fn(out, j=j, v=values[j, k]):
                out = out.clone()
                out[:, j] = v
                return out
            with replace_output(model, layer, fn):
                rows.append(reduce(model(x).unsqueeze(0))[0])
    return torch.stack(rows).reshape(u, s, -1)


@torch.no_grad()
def intervention_curves_loop(cut: Cut, h: torch.Tensor, values: torch.Tensor, reduce,
                             x: torch.Tensor | None = None) -> torch.Tensor:
    """Reference implementation (CARE's way): one suffix pass per (neuron, value). Speed benchmark only."""
    u, s = values.shape
    out = torch.empty(u, s, 0)
    carry = cut.carry(x) if (cut.carries and x is not None) else None
    rows = []
    for j in range(u):
        for k in range(s):
            hc = h.clone()
            hc[:, j] = values[j, k]
            rows.append(reduce(cut.suffix(hc, x, carried=carry).unsqueeze(0))[0])
    out = torch.stack(rows).reshape(u, s, -1)
    return out


# ----------------------------------------------------------------------------- the localiser

@dataclass
class CausalConfig:
    layers: list[str] | None = None   # default: CNN → the head's input, MLP → every hidden activation
    steps: int | None = None          # S intervention values per neuron; default per defect kind (4 / 16)
    keep: int | None = None           # neurons returned as sites; default per kind (backdoor 30, safety 27, fairness 13)
    samples: int = 1000               # inputs the expectation is taken over (seeded draw)
    output: str | None = None         # causal output name; default: the defect's kind, else 'generic'
    outputs: list[int] | None = None  # safety: which scores give curves (default COC and WL: [0, 1])
    loop: bool = False                # per-(neuron, value) reference loop instead of the batched passes
    max_elems: int = 1 << 24          # floats per batched suffix pass
    score: str | None = None          # range | mean (CARE, per kind) | drop: how far an intervention can LOWER the
                                      # curve below its unintervened value, max_v (y₀ − y(v)) (netmend option)
    cnn_layer: str | None = None      # CNN default layer (when `layers` is None): head = input of the classifier head
                                      # (CARE) | features = input of the first Linear, i.e. the flattened conv features,
                                      # one neuron per channel × position; default per kind (backdoor: features)
    inputs: bool | None = None        # also rank the input features (the output of the module feeding the first
                                      # weight layer, e.g. the MLP's `norm`) as neurons (netmend option)
    box_only: bool = False            # safety: take the expectation over the drawndown box samples only (CARE), not
                                      # the objective's whole keep set (which includes outside-box samples)
    specific: float = 0.0             # weight each score by (1 − a)^specific, a = the share of the probe's keep rows
                                      # (safety: the objective's outside-box samples) on which the neuron is non-zero:
                                      # scaling a neuron cannot change a row where it is zero (netmend option)
    seed: int = 0
    device: str = "cpu"


def input_layer(model: nn.Module) -> str:
    """The leaf module whose output is the first weight layer's input (its units are the input features)."""
    leaves = leaf_modules(model)
    names = [n for n, _ in leaves]
    first = weight_layers(model)[0]
    i = names.index(first)
    require(i > 0, f"no module feeds the first weight layer {first!r}: wrap the input in a named module (e.g. "
                   "a Normalize or Identity) to intervene on input features")
    return names[i - 1]


def rank(scores: torch.Tensor) -> list[int]:
    """Neuron order from per-curve scores (M, C): by curve 0, topped up by curves 1.. (CARE's merge)."""
    order: list[int] = []
    seen = set()
    for c in range(scores.shape[1]):
        for i in torch.argsort(scores[:, c], descending=True, stable=True).tolist():
            if i not in seen:
                seen.add(i)
                order.append(i)
    return order


@LOCALISERS.register("causal", "CARE: neurons ranked by the causal effect of interventions do(h = v) on the defect",
                     config=CausalConfig, needs=("objective",), defaults=causal_defaults)
def locate_causal(model: nn.Module, defect: Defect, cfg: CausalConfig) -> Sites:
    t0 = time.perf_counter()
    name = cfg.output
    spec = CAUSAL_OUTPUTS.get(name)
    steps, keep, score_kind = cfg.steps, cfg.keep, cfg.score
    require(steps >= 2, f"causal: steps must be ≥ 2, got {steps}")
    require(score_kind in ("range", "mean", "drop"), f"causal: unknown score {score_kind!r}")
    dev = torch.device(cfg.device)
    model = model.to(dev).eval()
    layers = list(cfg.layers or default_layers(model, cfg.cnn_layer))
    want_inputs = spec.inputs if cfg.inputs is None else cfg.inputs
    if want_inputs:
        try:
            first = input_layer(model)
        except NetmendError:
            if cfg.inputs:                # asked for explicitly: say why it cannot be done
                raise
            first = None                  # a per-kind default: hidden units only
        if first is not None and first not in layers:
            layers.insert(0, first)
    torch.manual_seed(cfg.seed)
    probe = spec.probe(model, defect, cfg)
    x, xr = probe.x.to(dev), probe.x_range.to(dev)
    all_scores, owners, curves_by_layer, values_by_layer = [], [], {}, {}
    for layer in layers:
        cut = Cut(model, layer)
        h, carry = cut.prefix(x, carried=True)
        hr = cut.prefix(xr) if len(xr) else h[:0]
        lo, hi = neuron_ranges(torch.cat([h, hr]))
        grid = torch.linspace(0, 1, steps, device=dev)
        values = lo[:, None] + grid[None, :] * (hi - lo)[:, None]
        fn = intervention_curves_loop if cfg.loop else intervention_curves
        kwargs = {} if cfg.loop else {"max_elems": cfg.max_elems, "carried": carry if cut.carries else None}
        curves = fn(cut, h, values, probe.reduce, x, **kwargs).float().cpu()   # (U, S, C)
        if score_kind == "drop":
            with torch.no_grad():
                y0 = probe.reduce(cut.suffix(h, x, carried=carry if cut.carries else None)
                                  .unsqueeze(0)).float().cpu()        # (1, C) unintervened
            score = y0 - curves.amin(1)
        else:
            score = (curves.amax(1) - curves.amin(1)) if score_kind == "range" else curves.mean(1)
        if cfg.specific and probe.x_keep is not None and len(probe.x_keep):
            with torch.no_grad():
                hk = cut.prefix(probe.x_keep.to(dev))
                active = hk.reshape(len(hk), len(score), -1).ne(0).any(-1).float().mean(0).cpu()
            score = score * (1 - active)[:, None] ** cfg.specific
        all_scores.append(score)
        owners += [(layer, i) for i in range(len(score))]
        curves_by_layer[layer], values_by_layer[layer] = curves, values.cpu()
    scores = torch.cat(all_scores)
    order = rank(scores)
    sites = [Site(owners[i][0], "neuron", float(scores[i, 0]), owners[i][1],
                  info={"scores": scores[i].tolist()}) for i in order[:keep]]
    details = {"layers": layers, "output": name, "curves_named": probe.curves, "steps": steps, "keep": keep,
               "score": score_kind, "samples": len(x), "ranking": [list(owners[i]) for i in order],
               "scores": {l: s for l, s in zip(layers, all_scores)}, "curves": curves_by_layer,
               "values": values_by_layer, "loop": cfg.loop}
    return Sites(sites, "causal", details, time.perf_counter() - t0)
