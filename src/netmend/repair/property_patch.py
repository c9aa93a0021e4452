"""Local patch for a safety property: the network is kept, and a few added neurons correct it inside the box only.

Why it exists: every global weight change moves the near-tie points of the whole domain. On the ACAS Xu networks,
scaling `property-tune`'s edit to a hundredth of its size already changes 0.3 % of the advisories outside the box,
and fine-tuning tops out at ~99.2–99.4 % fidelity whatever its batch, margin or optimiser (docs/methods/
property-patch.md). A patch that is zero outside the box cannot move those points at all.

The construction (a Linear/ReLU chain in, a wider and one layer deeper Linear/ReLU chain out; every original
weight is kept as it was):
  * layer 1 gains, per box, the distances past each face, s = relu(lo − δ − x) and relu(x − hi − δ);
  * layer 2 sums them, σ = Σ s ≥ 0 (zero in the box widened by δ), and later hidden layers carry σ unchanged
    (a network with one hidden layer: the patch neurons read the distances themselves);
  * the original output layer becomes a hidden layer: a copy of the last hidden layer (exact: it is ≥ 0), and per
    unsafe disjunct k and box b one patch neuron r = relu(m − (c_k·y + d_k) − S_k σ_b), where c_k y + d_k ≤ 0 is
    the row of disjunct k the patch makes positive and y the original outputs;
  * the new output layer is the original one plus V r, with c_k · V_j = [k = j].
In the box (σ = 0), c_k y' + d_k = max(c_k y + d_k, m) ≥ m > 0, so no disjunct can hold: safe by construction,
and CROWN proves it on the unsplit box (slope 1 on r cancels every other term). Outside the box by more than
δ + `band`, S_k σ exceeds the largest value m − (c_k y + d_k) takes on the domain (a CROWN bound over a grid of
sub-boxes), so r = 0 exactly and y' = y: the advisory cannot change there.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..defects.capabilities import require_capability
from ..edit import Edit
from ..errors import NetmendError, require
from ..methods import MethodPreset
from ..registry import METHODS, REPAIRERS
from ..sites import Sites


@dataclass
class PropertyPatchConfig:
    # margin: 1e-3, the margin property-tune's bound rounds ask for (the verifier's own tolerance is ~1e-9).
    # slack: the verifier widens the float32 box by one ulp (~6e-8); σ must stay exactly 0 on that box.
    margin: float = 1e-3          # m: in the box, every patched row is made at least this positive
    band: float = 1e-4            # width past the box (+ slack), in normalised input units, where the patch may act
    slack: float = 2e-6           # δ: the patch's box is the property's box widened by this
    grid: int = 4                 # splits per input dimension for the domain bound (≤ 4096 sub-boxes)
    row_samples: int = 4096       # box samples that choose each disjunct's row
    seed: int = 0
    device: str = "cpu"


def chain_layers(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a flat nn.Sequential of Linear and ReLU (ReLU between each pair, none at the end)."""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else []
    kinds = ["L" if isinstance(m, nn.Linear) else "R" if isinstance(m, nn.ReLU) else "?" for m in mods]
    if not mods or "".join(kinds) != "R".join("L" * (kinds.count("L"))) or kinds.count("L") < 2:
        found = "" if not mods else f" (found {', '.join(type(m).__name__ for m in mods[:6])})"
        raise NetmendError("property-patch needs an nn.Sequential of Linear and ReLU layers with a hidden layer at "
                           f"least, ReLU between each pair{found}")
    return [m for m in mods if isinstance(m, nn.Linear)]


MAX_SUBBOXES = 4096


def _domain_bounds(net, dlo, dhi, C, d, grid: int):
    """Lower bounds of the outputs' rows C y + d over the domain (min over a grid of sub-boxes, CROWN)."""
    from ..verify import crown_bounds

    n = len(dlo)
    # `grid` splits along the widest dimensions, as many of them as keep the sub-boxes ≤ MAX_SUBBOXES
    k = min(n, int(math.log(MAX_SUBBOXES) / math.log(grid))) if grid > 1 else 0
    split = set(torch.argsort(dhi - dlo, descending=True)[:k].tolist())
    parts = [grid if i in split else 1 for i in range(n)]
    edges = [torch.linspace(float(a), float(b), p + 1, dtype=torch.float64) for a, b, p in zip(dlo, dhi, parts)]
    idx = torch.tensor(list(itertools.product(*(range(p) for p in parts))))
    lo = torch.stack([edges[i][idx[:, i]] for i in range(n)], 1)
    hi = torch.stack([edges[i][idx[:, i] + 1] for i in range(n)], 1)
    return crown_bounds(net, lo, hi, C, d, mode="forward").lower.amin(0)


def patch_layers(net, boxes, rows, dlo, dhi, cfg: PropertyPatchConfig
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """The patched chain's (weights, biases), float64, from the network's (a ReluNet). rows: one (c, d) per unsafe
    disjunct, to be made ≥ margin."""
    ws, bs = net.weights, net.biases
    L = len(ws) - 1                                  # hidden layers
    n_in, n_out = ws[0].shape[1], ws[-1].shape[0]
    sizes = [w.shape[0] for w in ws[:-1]]
    nb, P = len(boxes), len(rows)
    C = torch.stack([c for c, _ in rows])
    d = torch.stack([dd for _, dd in rows])
    V = C.T @ torch.linalg.inv(C @ C.T)              # (n_out, P): C V = I (the rows are independent: _choose_rows)
    worst = (cfg.margin - _domain_bounds(net, dlo, dhi, C, d, cfg.grid)).clamp_min(cfg.margin)
    steep = worst / cfg.band                         # S_k: past the band, S_k σ ≥ the largest m − (c_k y + d_k)
    f64 = dict(dtype=torch.float64)
    nw, nbias = [], []
    # layer 1: the original units, then per box 2 × n_in face distances
    w = torch.zeros(sizes[0] + 2 * n_in * nb, n_in, **f64)
    b = torch.zeros(len(w), **f64)
    w[:sizes[0]], b[:sizes[0]] = ws[0], bs[0]
    o = sizes[0]
    for lo, hi in boxes:
        for i in range(n_in):
            w[o, i], b[o] = -1.0, float(lo[i]) - cfg.slack
            w[o + 1, i], b[o + 1] = 1.0, -float(hi[i]) - cfg.slack
            o += 2
    nw.append(w), nbias.append(b)
    # layers 2..L: the original units, then σ_b per box (layer 2 sums the face distances, later layers copy σ)
    for k in range(1, L):
        prev = nw[-1].shape[0]
        w = torch.zeros(sizes[k] + nb, prev, **f64)
        b = torch.zeros(len(w), **f64)
        w[:sizes[k], :sizes[k - 1]], b[:sizes[k]] = ws[k], bs[k]
        for j in range(nb):
            if k == 1:
                w[sizes[k] + j, sizes[0] + 2 * n_in * j: sizes[0] + 2 * n_in * (j + 1)] = 1.0
            else:
                w[sizes[k] + j, sizes[k - 1] + j] = 1.0
        nw.append(w), nbias.append(b)
    # the original output layer becomes hidden: a copy of the last hidden layer, then the patch neurons, which read
    # σ_b (one hidden layer only: the face distances themselves, σ_b being their sum)
    last = sizes[-1]
    w = torch.zeros(last + P * nb, nw[-1].shape[0], **f64)
    b = torch.zeros(len(w), **f64)
    w[:last, :last] = torch.eye(last, **f64)
    for k in range(P):
        for j in range(nb):
            r = last + k * nb + j
            w[r, :last] = -(C[k] @ ws[L])
            b[r] = cfg.margin - C[k] @ bs[L] - d[k]
            if L == 1:
                w[r, last + 2 * n_in * j: last + 2 * n_in * (j + 1)] = -steep[k]
            else:
                w[r, last + j] = -steep[k]
    nw.append(w), nbias.append(b)
    # new output layer: the original outputs plus V r
    w = torch.zeros(n_out, len(b), **f64)
    w[:, :last] = ws[L]
    for k in range(P):
        w[:, last + k * nb: last + (k + 1) * nb] = V[:, k:k + 1]
    nw.append(w), nbias.append(bs[L].clone())
    info = {"patch_neurons": P * nb, "boxes": nb, "rows": [[float(x) for x in c] + [float(dd)] for c, dd in rows],
            "steepness": steep.tolist(), "domain_worst": worst.tolist()}
    return nw, nbias, info


def _choose_rows(net, prop, x_box: torch.Tensor, margin: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row per unsafe disjunct, linearly independent across disjuncts (so one correction cannot undo another),
    with the smallest total mean correction to ≥ margin over the box samples. Every combination is tried when there
    are at most 4 096 of them, else each disjunct's cheapest row that keeps the set independent, fewest rows first."""
    y = net.forward(x_box.double())
    options = []                           # per disjunct: [(cost, c, d)] cheapest first
    for c, d in prop.unsafe:
        c, d = c.double(), d.double()
        cost = torch.relu(margin - (y @ c.T + d)).mean(0)
        options.append(sorted(((float(cost[r]), c[r], d[r]) for r in range(len(d))), key=lambda t: t[0]))

    def independent(rows) -> bool:
        m = torch.stack([c for _, c, _ in rows])
        return int(torch.linalg.matrix_rank(m @ m.T)) == len(rows)

    best = None
    if math.prod(len(o) for o in options) <= 4096:
        for combo in itertools.product(*options):
            total = sum(t[0] for t in combo)
            if (best is None or total < best[0]) and independent(combo):
                best = (total, combo)
        chosen = list(best[1]) if best else None
    else:
        picked: dict[int, tuple] = {}
        for k in sorted(range(len(options)), key=lambda k: len(options[k])):
            row = next((t for t in options[k] if independent([*picked.values(), t])), None)
            if row is None:
                break
            picked[k] = row
        chosen = [picked[k] for k in range(len(options))] if len(picked) == len(options) else None
    require(chosen is not None, "property-patch: no choice of one row per unsafe disjunct is linearly independent, "
            "so no one patch can satisfy them all; use property-tune for this property")
    return [(c, d) for _, c, d in chosen]


@REPAIRERS.register("property_patch", "add neurons that correct the outputs inside the property's box only (zero "
                                      "past a thin band around it): safe by construction, the original weights kept",
                    config=PropertyPatchConfig, needs=("property-region",))
def property_patch(model: nn.Module, defect: Defect, sites: Sites | None, cfg: PropertyPatchConfig) -> Edit:
    require_capability(defect, "property-region", "property_patch")
    require(cfg.margin > 0 and cfg.band > 0 and cfg.slack > 0, "property_patch: margin, band and slack must be > 0")
    require(cfg.grid >= 1 and cfg.row_samples >= 1, "property_patch: grid and row_samples must be ≥ 1")
    if sites is not None and sites.sites:
        raise NetmendError("property-patch adds neurons and keeps every weight; it takes no localised sites")
    t0 = time.perf_counter()
    from ..verify import relu_chain

    linears = chain_layers(model)                # the strict shape the new chain replaces; weights as the verifier's
    net = relu_chain(model)
    prop = defect.prop
    require(net.n_in == prop.n_inputs and net.n_out == prop.n_outputs,
            f"property {prop.name} speaks of {prop.n_inputs} inputs / {prop.n_outputs} outputs, the network has "
            f"{net.n_in} / {net.n_out}")
    dlo, dhi = defect.domain()
    boxes = [(lo.double(), hi.double()) for lo, hi in prop.boxes]
    dlo = torch.minimum(dlo.double(), torch.stack([lo for lo, _ in boxes]).amin(0))
    dhi = torch.maximum(dhi.double(), torch.stack([hi for _, hi in boxes]).amax(0))
    g = torch.Generator().manual_seed(int(cfg.seed) + 777)      # repair-only stream
    rows = _choose_rows(net, prop, prop.sample(cfg.row_samples, g), cfg.margin)
    nw, nbias, info = patch_layers(net, boxes, rows, dlo, dhi, cfg)
    dtype = linears[0].weight.dtype
    layers = [(w.to(dtype), b.to(dtype)) for w, b in zip(nw, nbias)]
    before = sum(w.numel() + b.numel() for w, b in zip(net.weights, net.biases))
    after = sum(w.numel() + b.numel() for w, b in layers)
    return Edit({}, {"repairer": "property_patch", **info, "added_parameters": after - before,
                     "hidden": [w.shape[0] for w, _ in layers[:-1]], "seconds": time.perf_counter() - t0},
                layers=layers)


METHODS.add("property-patch", MethodPreset(None, "property_patch", uses_pairs=False, defects=("safety",),
                                           paper="netmend (a local patch in the spirit of REASSURE; not from the "
                                                 "papers)"),
            "safety: add neurons that correct the outputs inside the property's box only; every original weight "
            "kept, the network one layer deeper")
