"""FT-SAM (Zhu et al., ICCV 2023): fine-tune on clean data with sharpness-aware minimisation.

Every step first climbs to the worst weights in a ρ-ball around the current ones (the ascent ε = ρ·g/‖g‖, or
with adaptive SAM ε = ρ·w²⊙g/‖|w|⊙g‖, whose ball is scaled per weight by |w|), takes the gradient there, puts the
weights back and lets SGD step with that gradient. Backdoor weights are large and sit in a sharp region of the clean
loss, so the adaptive ascent perturbs them most and the descent shrinks them: the trigger's path is unlearned by
fine-tuning that plain CE leaves alone. BackdoorBench's defaults: adaptive SAM, ρ = 2, label smoothing 0.1, SGD lr 0.01,
momentum 0.9, weight decay 5e-4.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

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
from .finetune import freeze_batchnorm, site_parameters

FTSAM_PAPER = "Zhu et al., ICCV 2023"


@dataclass
class FTSAMConfig:
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    rho: float = 2.0              # radius of the ascent step (BackdoorBench's rho_max = rho_min = 2 for adaptive SAM)
    adaptive: bool = True         # adaptive SAM (ASAM): the ball is scaled per weight by |w|; False: plain SAM
    label_smoothing: float = 0.1  # CE label smoothing, as BackdoorBench's FT-SAM
    use_pairs: bool = True        # add the cleansed twins of the evidence pairs, with their true labels
    seed: int = 0
    device: str = "cpu"


@torch.no_grad()
def sam_perturb(params: Sequence[torch.Tensor], rho: float, adaptive: bool = False,
                eps: float = 1e-12) -> list[torch.Tensor | None]:
    """The ascent step of SAM, in place: each parameter with a gradient moves by ε = ρ·g/‖g‖ (the norm over all
    of them); adaptive: ε = ρ·w²⊙g/‖|w|⊙g‖. Returns the ε applied (None for parameters without a gradient)."""
    grads = [p.grad if p.grad is not None else None for p in params]
    scaled = [(p.abs() * g if adaptive else g) for p, g in zip(params, grads) if g is not None]
    if not scaled:
        return [None] * len(params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + eps)
    out: list[torch.Tensor | None] = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(None)
            continue
        e = g * scale.to(g)
        if adaptive:
            e = e * p.pow(2)
        p.add_(e)
        out.append(e)
    return out


def sam_step(params: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
             rho: float, adaptive: bool = False, grad_mask: dict | None = None) -> torch.Tensor:
    """One SAM update: gradient at w, ascend to w + ε (`sam_perturb`), gradient there, back to w, then `opt` steps
    with the gradient taken at w + ε. `loss_fn()` runs the forward pass; `grad_mask` (parameter → 0/1) restricts both
    gradients. Returns the loss at w."""
    params = list(params)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    _mask(grad_mask)
    old = [p.detach().clone() for p in params]
    sam_perturb(params, rho, adaptive)
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    _mask(grad_mask)
    with torch.no_grad():
        for p, w in zip(params, old):
            p.copy_(w)
    opt.step()
    return loss.detach()


def _mask(grad_mask: dict | None) -> None:
    for p, m in (grad_mask or {}).items():
        if p.grad is not None:
            p.grad.mul_(m)


@REPAIRERS.register("ft-sam", "fine-tuning with (adaptive) sharpness-aware minimisation on the clean repair data "
                    "(optionally only at the sites)", config=FTSAMConfig)
def ft_sam(model: nn.Module, defect: Defect, sites: Sites | None, cfg: FTSAMConfig) -> Edit:
    require(cfg.rho >= 0, f"FT-SAM: rho must be ≥ 0, got {cfg.rho}")
    require(0 <= cfg.label_smoothing < 1, f"FT-SAM: label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    work = copy.deepcopy(model).to(cfg.device).eval()
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    x, y = defect.tuning_set(cfg.use_pairs)
    require(len(x) > 0, "FT-SAM: no clean repair data to tune on")
    params, masks = site_parameters(work, sites, defect.repair.x_fit)
    params = list(params) if params is not None else [p for p in work.parameters() if p.requires_grad]
    masks = {p: m.to(p.device, p.dtype) for p, m in masks.items()} if masks else None
    frozen = {p: p.detach().clone() for p in masks} if masks else {}
    freeze_batchnorm(work)
    work.train()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    total = 0.0
    seen = 0
    with progress("FT-SAM", total=steps) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=g)
            total, seen = 0.0, 0
            for i in range(0, len(x), cfg.batch_size):
                b = perm[i: i + cfg.batch_size]
                xb, yb = x[b].to(cfg.device), y[b].to(cfg.device)

                def loss_fn() -> torch.Tensor:
                    return F.cross_entropy(defect.decision_logits(work(xb)), yb, label_smoothing=cfg.label_smoothing)

                loss = sam_step(params, loss_fn, opt, cfg.rho, cfg.adaptive, masks)
                if masks:                      # weight decay and momentum must not move the unmasked entries
                    with torch.no_grad():
                        for p, m in masks.items():
                            p.copy_(torch.where(m.bool(), p, frozen[p]))
                total += float(loss) * len(b)
                seen += len(b)
                bar.advance()
    work.cpu().eval()
    names = [n for n, _ in work.named_parameters()]
    return Edit.between(before, work, {"repairer": "ft-sam", "samples": len(y), "rho": cfg.rho,
                                       "adaptive": cfg.adaptive, "last_epoch_loss": total / max(seen, 1)}, names=names)


METHODS.add("ft-sam", MethodPreset(None, "ft-sam", paper=FTSAM_PAPER),
            "fine-tune with adaptive sharpness-aware minimisation (FT-SAM), which shrinks the backdoor's sharp weights")
