"""Simple localisers, baselines for the papers' ones: dormant units (fine-pruning) and gradient saliency."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..errors import NetmendError
from ..hooks import capture, get_layer, weight_layers
from ..registry import LOCALISERS
from ..sites import Site, Sites


def head_layer(model: nn.Module) -> str:
    """The last Linear/Conv2d in the model: the classifier head."""
    layers = weight_layers(model)
    if not layers:
        raise NetmendError("the model has no Linear or Conv2d layer to repair")
    return layers[-1]


@dataclass
class DormantConfig:
    layer: str | None = None      # weight module whose *input* units are ranked; default: the head
    batch_size: int = 512


@LOCALISERS.register("dormant", "units feeding a layer ranked by mean activation on clean data, most dormant first",
                     config=DormantConfig)
def locate_dormant(model: nn.Module, defect: Defect, cfg: DormantConfig) -> Sites:
    t0 = time.perf_counter()
    layer = cfg.layer or head_layer(model)
    get_layer(model, layer)
    x = defect.repair.x_fit
    total = None
    model.eval()
    with torch.no_grad(), capture(model, layer) as cap:
        for i in range(0, len(x), cfg.batch_size):
            model(x[i: i + cfg.batch_size])
            k = cap.inputs[layer]
            k = k.flatten(2).mean(2) if k.dim() > 2 else k     # conv input: mean over positions
            s = k.sum(0)
            total = s if total is None else total + s
    mean = total / len(x)
    order = torch.argsort(mean)
    sites = [Site(layer, "neuron", float(mean[i]), int(i), info={"role": "input unit"}) for i in order.tolist()]
    return Sites(sites, "dormant", {"layer": layer, "mean_activation": mean}, time.perf_counter() - t0)


@dataclass
class GradientConfig:
    layers: list[str] | None = None   # default: every Linear/Conv2d
    top: int = 10


@LOCALISERS.register("gradient", "units ranked by |activation × gradient| of the defect's violation on the evidence",
                     config=GradientConfig)
def locate_gradient(model: nn.Module, defect: Defect, cfg: GradientConfig) -> Sites:
    t0 = time.perf_counter()
    layers = cfg.layers or weight_layers(model)
    x, y = defect.evidence()
    model.eval()
    with capture(model, layers, detach=False) as cap:
        v = defect.violation(model, x, y).sum()
        outs = [cap.outputs[n] for n in layers]
        grads = torch.autograd.grad(v, outs)
    sites = []
    for name, h, g in zip(layers, outs, grads):
        s = (h * g).detach().abs()
        s = s.flatten(2).sum(2) if s.dim() > 2 else s
        s = s.mean(0)
        for i in torch.argsort(s, descending=True)[: cfg.top].tolist():
            sites.append(Site(name, "neuron", float(s[i]), int(i)))
    sites.sort(key=lambda s: -s.score)
    return Sites(sites, "gradient", {"layers": layers}, time.perf_counter() - t0)
