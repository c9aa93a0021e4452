"""Class Artifact Compensation (ClArC; Anders et al., Information Fusion 2022), Yang et al.'s baselines.

The artefact's concept-activation vector (CAV) at a layer is taken from the evidence pairs:
v = mean_j (h(x̃_j) − h(x_j)) / ‖·‖, h = the input of the chosen weight module (spatially averaged
for a conv). Then

- **P-ClArC** projects the artefact out: h ↦ h − v (vᵀh − ζ), ζ = mean vᵀh on clean repair data.
  The projection is affine, so it is baked into the module's weights: W' = W − (Wv)vᵀ,
  b' = b + ζ·Wv (a conv: per kernel tap, bias summed over taps; exact away from padded borders).
- **A-ClArC** fine-tunes the module and everything after it on clean repair data while a forward
  hook *adds* the artefact to a share of the samples of every class, h ↦ h − v (vᵀh − ζ_art),
  ζ_art = mean vᵀh(x̃); the model learns that the direction says nothing about the class. The hook
  is gone afterwards: the Edit holds only the weight changes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import NetmendError, require
from ..hooks import capture, get_layer, pre_hook, weight_layers
from ..methods import MethodPreset
from ..registry import METHODS, REPAIRERS
from ..sites import Sites
from ..train import TrainConfig, fit
from .finetune import freeze_batchnorm

CLARC_PAPER = "Anders et al., Finding and removing Clever Hans (ClArC), Information Fusion 2022"


def _inputs(model: nn.Module, layer: str, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Input of `layer` for x, spatially averaged to channel vectors for 4-D maps (float64, CPU)."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    model.eval()
    with torch.no_grad(), capture(model, layer) as cap:
        for i in range(0, len(x), batch):
            model(x[i: i + batch].to(dev))
            h = cap.inputs[layer]
            out.append((h.mean((2, 3)) if h.dim() == 4 else h.flatten(1)).double().cpu())
    return torch.cat(out)


def _layer(model: nn.Module, name: str | None) -> str:
    layers = weight_layers(model)
    require(bool(layers), "the model has no Linear or Conv2d layer")
    name = name or layers[-1]
    mod = get_layer(model, name)
    require(isinstance(mod, (nn.Linear, nn.Conv2d)), f"ClArC projects the input of a Linear/Conv2d; {name!r} is {type(mod).__name__}")
    return name


def artefact_cav(model: nn.Module, defect: Defect, layer: str, n: int | None = None) -> tuple[torch.Tensor, dict]:
    """Unit CAV from the pairs' activation differences at the input of `layer`, and its statistics."""
    pairs = defect.require_pairs("ClArC")
    pairs = pairs if n is None else pairs.subset(int(n))
    hb, hc = _inputs(model, layer, pairs.corrupted), _inputs(model, layer, pairs.clean)
    d = (hb - hc).mean(0)
    norm = float(d.norm())
    if norm < 1e-12:
        raise NetmendError(f"the pairs' activations do not differ at the input of {layer!r}; choose another layer")
    v = d / norm
    return v, {"cav_norm": norm, "artefact_level": float((hb @ v).mean()), "pairs": len(pairs)}


# ----------------------------------------------------------------------------- P-ClArC

@dataclass
class PClarcConfig:
    layer: str | None = None       # weight module whose input is projected (default: the classifier head)
    pairs: int | None = None       # first n pairs for the CAV (None = all)
    seed: int = 0
    device: str = "cpu"


@REPAIRERS.register("p-clarc", "P-ClArC: project the artefact CAV out of a layer's input, baked into its weights",
                    config=PClarcConfig, needs=("pairs",))
def p_clarc(model: nn.Module, defect: Defect, sites: Sites | None, cfg: PClarcConfig) -> Edit:
    layer = _layer(model, cfg.layer or (sites.layers()[0] if sites is not None and len(sites) else None))
    v, info = artefact_cav(model, defect, layer, cfg.pairs)
    zeta = float((_inputs(model, layer, defect.repair.x_fit) @ v).mean())
    mod = get_layer(model, layer)
    W = mod.weight.detach().double().cpu()
    vv = v.to(W)
    if W.dim() == 2:
        Wv = W @ vv                                                   # (out,)
        dW = -torch.outer(Wv, vv)
        bias_shift = zeta * Wv
    else:
        Wv = torch.einsum("oiyx,i->oyx", W, vv)                       # per-tap response to v
        dW = -torch.einsum("oyx,i->oiyx", Wv, vv)
        bias_shift = zeta * Wv.sum((1, 2))
    deltas = {f"{layer}.weight": dW.to(mod.weight.dtype)}
    if mod.bias is not None:
        deltas[f"{layer}.bias"] = bias_shift.to(mod.bias.dtype)
    else:
        info["bias_missing"] = "no bias: the clean level ζ is not restored (projection onto vᵀh = 0)"
    return Edit(deltas, {"repairer": "p-clarc", "layer": layer, "zeta": zeta, **info})


# ----------------------------------------------------------------------------- A-ClArC

@dataclass
class AClarcConfig:
    layer: str | None = None         # weight module whose input receives the artefact (default: the head)
    pairs: int | None = None
    tune: str = "from"               # from: that module and every weight module after it | all
    artefact_share: float = 0.5      # share of each batch (all classes) given the artefact
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    use_pairs: bool = True           # add the cleansed twins (true labels) to the training data
    seed: int = 0
    device: str = "cpu"


@REPAIRERS.register("a-clarc", "A-ClArC: fine-tune with the artefact direction added to samples of all classes",
                    config=AClarcConfig, needs=("pairs",))
def a_clarc(model: nn.Module, defect: Defect, sites: Sites | None, cfg: AClarcConfig) -> Edit:
    require(cfg.tune in ("from", "all"), f"tune must be 'from' or 'all', got {cfg.tune!r}")
    require(0 <= cfg.artefact_share <= 1, f"artefact_share must be in [0, 1], got {cfg.artefact_share}")
    work = copy.deepcopy(model).to(cfg.device)
    layer = _layer(work, cfg.layer or (sites.layers()[0] if sites is not None and len(sites) else None))
    v, info = artefact_cav(work, defect, layer, cfg.pairs)
    before = {k: t.detach().clone() for k, t in work.named_parameters()}
    names = weight_layers(work)
    tuned = names[names.index(layer):] if cfg.tune == "from" else names
    params = [p for n in tuned for p in get_layer(work, n).parameters(recurse=False)]
    g = torch.Generator().manual_seed(int(cfg.seed) + 17)
    level = info["artefact_level"]

    def add_artefact(_m, inp):
        h = inp[0]
        if not torch.is_grad_enabled() or not work.training:
            return None
        pick = (torch.rand(len(h), generator=g) < cfg.artefact_share).to(h.device)
        vv = v.to(h.device, h.dtype)
        shape = (1, -1, 1, 1) if h.dim() == 4 else (1, -1)
        along = (h * vv.view(shape)).sum(1, keepdim=True)             # per position for a conv map
        moved = h - vv.view(shape) * (along - level)
        keep = pick.view(-1, *([1] * (h.dim() - 1)))
        return (torch.where(keep, moved, h),) + tuple(inp[1:])

    with pre_hook(get_layer(work, layer), add_artefact):
        freeze_batchnorm(work)
        x, y = defect.tuning_set(cfg.use_pairs)
        tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                         weight_decay=cfg.weight_decay, seed=cfg.seed)
        fit(work, x, y, tc, cfg.device, desc="a-clarc", params=params, output=defect.decision_logits)
    work.cpu()
    return Edit.between(before, work, {"repairer": "a-clarc", "layer": layer, "tuned": tuned, "samples": len(y), **info},
                        names=list(before))


METHODS.add("p-clarc", MethodPreset(None, "p-clarc", paper=CLARC_PAPER),
            "P-ClArC: project the artefact's concept-activation vector out at the head's input (baseline)")
METHODS.add("a-clarc", MethodPreset(None, "a-clarc", paper=CLARC_PAPER),
            "A-ClArC: fine-tune with the artefact direction added to all classes (baseline)")
