"""A pruning baseline: set the weights of the top-k localised sites to zero.

What a localiser's ranking is worth on its own, with no fitting at all: `--locate causal --repair zero-sites` zeroes
the weights CARE's causal neurons feed through, `--locate probe --repair zero-sites` INNER's fault weights. A method
that fits (CARE's swarm, INNER's masked tuning) should beat it on the same sites.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import require
from ..hooks import get_layer
from ..registry import REPAIRERS
from ..sites import Sites


@dataclass
class ZeroSitesConfig:
    top: int = 5                     # how many of the best-ranked sites to zero
    seed: int = 0
    device: str = "cpu"


@REPAIRERS.register("zero-sites", "zero the weights of the top-k localised sites (a pruning baseline)",
                    config=ZeroSitesConfig)
def zero_sites(model: nn.Module, defect: Defect, sites: Sites | None, cfg: ZeroSitesConfig) -> Edit:
    require(sites is not None and len(sites) > 0, "zero-sites needs sites: name a localiser (e.g. --locate causal)")
    require(cfg.top >= 1, f"zero-sites: top must be ≥ 1, got {cfg.top}")
    top = Sites(list(sites)[: cfg.top], sites.localiser)
    deltas = {}
    for layer, mask in top.masks(model, defect.repair.x_fit).items():
        w = get_layer(model, layer).weight.detach().cpu()
        deltas[f"{layer}.weight"] = torch.where(mask.bool(), -w, torch.zeros_like(w))
    return Edit(deltas, {"repairer": "zero-sites", "sites_zeroed": len(top), "layers": sorted(deltas)})
