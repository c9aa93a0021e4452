"""Attribution-guided localisation (Yang et al.; docs/methods/rectify.md): which layer is most *editable*.

For each candidate site, layer integrated gradients along the straight path x̃ → x (corrupted sample as
baseline, cleansed sample as input) gives M^l, whose units sum to F(x) − F(x̃) at every full cut.
The editability score is Ĝ_l = ‖m_l‖·‖d_l‖ with m_l = M^l summed over positions (and pairs) and
d_l = C_l⁻¹ k̄*_l the rank-one edit direction at the site's weight module.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from captum.attr import LayerConductance, LayerIntegratedGradients
from torch import nn

from ..defects.base import Defect
from ..errors import require
from ..hooks import capture, get_layer, weight_layers
from ..registry import LOCALISERS
from ..editing import (cached_moment, check_editable, flat_keys, key_mask, prefetch_moments, select_pairs, solve,
                       statistics_inputs)
from ..sites import Site, Sites

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.Softplus)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
RESIDUAL_MARKERS = ("shortcut", "downsample")


@dataclass(frozen=True)
class Candidate:
    """An edit site: `weight` is edited, `point` is where attributions are read (a cut), `value` is matched."""

    weight: str
    point: str
    value: str


def _point_after(model: nn.Module, name: str) -> str:
    """The output after the weight's norm/activation siblings in a Sequential parent (a cut), else the module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return name
    names = [n for n, _ in parent.named_children()]
    point = child
    for n in names[names.index(child) + 1:]:
        mod = getattr(parent, n)
        if isinstance(mod, NORMS):
            point = n
            continue
        if isinstance(mod, ACTIVATIONS):
            point = n
        break
    if point != child and not isinstance(getattr(parent, point), ACTIVATIONS):
        point = child                       # a norm without an activation is no better a cut than the weight
    return f"{parent_name}.{point}" if parent_name else point


def _residual_blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(hasattr(m, r) and isinstance(getattr(m, r), nn.Module)
                                                             for r in RESIDUAL_MARKERS)]


def candidate_sites(model: nn.Module, layers: list[str] | None = None) -> list[Candidate]:
    """Default candidates: one site per residual block (its last conv, read at the block output) plus every
    Linear/Conv2d outside blocks (read after its activation). `layers` restricts to given weight names."""
    blocks = _residual_blocks(model)
    out: list[Candidate] = []
    inside = set()
    for b in blocks:
        block = model.get_submodule(b)
        convs = [f"{b}.{n}" for n, m in block.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(n.startswith(r) for r in RESIDUAL_MARKERS)]
        inside.update(f"{b}.{n}" for n, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        if convs:
            out.append(Candidate(convs[-1], b, b))
    for n in weight_layers(model):
        if n not in inside:
            out.append(Candidate(n, _point_after(model, n), n))
    order = {n: i for i, n in enumerate(weight_layers(model))}
    out.sort(key=lambda c: order[c.weight])
    if layers:
        by_weight = {c.weight: c for c in out}
        chosen = []
        for name in layers:
            check_editable(model, name)
            chosen.append(by_weight.get(name, Candidate(name, _point_after(model, name), name)))
        out = chosen
    require(len(out) > 0, "the model has no Linear or Conv2d layer to localise")
    return out


def static_site(model: nn.Module) -> Candidate:
    """Santurkar's static site: the last candidate before the classifier head (the last feature layer)."""
    cands = candidate_sites(model)
    return cands[-2] if len(cands) >= 2 else cands[-1]


# ----------------------------------------------------------------------------- the explained output F

def _logit(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return z.gather(1, y[:, None])[:, 0]


def _prob(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.softmax(z, 1).gather(1, y[:, None])[:, 0]


def _margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    zy = _logit(z, y)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return zy - other


OUTPUTS: dict[str, Callable] = {"logit": _logit, "prob": _prob, "margin": _margin}
VARIANTS = {"A": LayerIntegratedGradients, "B": LayerConductance}


@dataclass
class AttributionConfig:
    layers: list[str] | None = None   # candidate weight modules (dotted names); default: see candidate_sites
    variant: str = "A"                # A: layer-space path (Captum LayerIntegratedGradients) | B: conductance
    output: str = "logit"             # F: logit | prob | margin of the true class
    n_steps: int = 32
    score: str = "editability"        # editability ‖m‖‖d‖ | scale-free ‖m‖√(k̄ᵀC⁻¹k̄) | attribution ‖m‖
    pairs: int | None = None          # first n of the defect's pairs (None = all)
    mask_keys: bool = True            # conv: k̄* averaged over trigger-mask positions when a mask is known
    rho: float = 1e-4
    stats_include_val: bool = False
    internal_batch_size: int = 256
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"


def layer_attribution(model: nn.Module, point: str, x: torch.Tensor, x_bad: torch.Tensor, y: torch.Tensor,
                      cfg: AttributionConfig) -> torch.Tensor:
    """M^l for every pair (one Captum call per site: Captum forbids mutually dependent layers in one call)."""
    require(cfg.output in OUTPUTS, f"unknown attribution output {cfg.output!r}; use one of {sorted(OUTPUTS)}")
    require(cfg.variant in VARIANTS, f"unknown IG variant {cfg.variant!r}; use one of {sorted(VARIANTS)}")
    fn = OUTPUTS[cfg.output]

    def forward(inp, labels):
        return fn(model(inp), labels)

    method = VARIANTS[cfg.variant](forward, get_layer(model, point))
    kwargs = {"internal_batch_size": cfg.internal_batch_size} if cfg.variant == "A" else {}
    return method.attribute(inputs=x, baselines=x_bad, additional_forward_args=(y,), n_steps=cfg.n_steps, **kwargs)


def site_direction(model: nn.Module, defect: Defect, weight: str, x_bad: torch.Tensor, masks, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, k̄*, d = C⁻¹k̄*): the mean corrupted key at the weight's input (mask positions for convs)."""
    mod = check_editable(model, weight)
    with torch.no_grad(), capture(model, weight) as cap:
        model(x_bad)
    k = cap.inputs[weight]
    keys = flat_keys(mod, k)
    if isinstance(mod, nn.Conv2d) and cfg.mask_keys and masks is not None:
        m = key_mask(masks, tuple(k.shape[-2:])).reshape(-1).to(keys.device)
        if m.sum() > 0:
            keys = keys[m > 0]
    kbar = keys.double().mean(0)
    C = cached_moment(model, weight, statistics_inputs(defect, cfg.stats_include_val), cfg.batch_size, cfg.device)
    d, _ = solve(C, kbar, cfg.rho)
    return C, kbar, d


def attribution_sites(model: nn.Module, defect: Defect, cfg: AttributionConfig) -> Sites:
    """Rank candidate sites by editability; every site's factors are kept in `details`."""
    t0 = time.perf_counter()
    require(cfg.score in ("editability", "scale-free", "attribution"), f"unknown score {cfg.score!r}")
    require(cfg.output in OUTPUTS, f"unknown attribution output {cfg.output!r}; use one of {sorted(OUTPUTS)}")
    require(cfg.variant in VARIANTS, f"unknown IG variant {cfg.variant!r}; use one of {sorted(VARIANTS)}")
    model.eval()
    pairs = select_pairs(defect, cfg.pairs)
    dev = cfg.device
    x, xb, y = pairs.clean.to(dev), pairs.corrupted.to(dev), pairs.labels.to(dev)
    with torch.no_grad():
        f_x, f_b = OUTPUTS[cfg.output](model(x), y), OUTPUTS[cfg.output](model(xb), y)
    delta = float((f_x - f_b).sum())
    details: dict = {}
    sites = []
    cands = candidate_sites(model, cfg.layers)
    # every site's C (for its direction d) from one pass over the statistics set, not one pass per site
    prefetch_moments(model, [c.weight for c in cands], statistics_inputs(defect, cfg.stats_include_val),
                     cfg.batch_size, cfg.device)
    for cand in cands:
        M = layer_attribution(model, cand.point, x, xb, y, cfg).detach()
        total = float(M.sum())
        m = M.flatten(2).sum(2) if M.dim() > 2 else M.reshape(len(M), -1)
        m = m.double().mean(0)
        _, kbar, d = site_direction(model, defect, cand.weight, xb, pairs.masks, cfg)
        m_norm, d_norm = float(m.norm()), float(d.norm())
        scale_free = m_norm * float(torch.clamp(kbar @ d, min=0).sqrt())
        score = {"editability": m_norm * d_norm, "scale-free": scale_free, "attribution": m_norm}[cfg.score]
        info = {"point": cand.point, "value_point": cand.value, "m_norm": m_norm, "d_norm": d_norm,
                "editability": m_norm * d_norm, "scale_free": scale_free, "attribution_sum": total,
                "completeness_error": abs(total - delta) / (abs(delta) + 1e-12)}
        details[cand.weight] = info
        sites.append(Site(cand.weight, "layer", score, info=info))
    sites.sort(key=lambda s: -s.score)
    return Sites(sites, "attribution", {"scores": details, "delta_f": delta, "config": dataclasses.asdict(cfg)},
                 time.perf_counter() - t0)


@LOCALISERS.register("attribution", "layer IG along x̃ → x times the rank-one direction norm: editability per layer "
                                    "(Yang et al.)", config=AttributionConfig,
                     needs=("pairs",))
def locate_attribution(model: nn.Module, defect: Defect, cfg: AttributionConfig) -> Sites:
    return attribution_sites(model, defect, cfg)
