"""Fine-tuning baseline: cross-entropy on the defect's clean repair data (and cleansed pairs).

Given sites, only those layers are tuned; weight sites with a mask tune only the masked weights
(so any localiser — INNER's fault weights, CARE's neurons — can drive fine-tuning); a neuron of a
weightless layer tunes the columns of the next weight layer that read it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..defects.capabilities import require_capability
from ..edit import Edit
from ..hooks import add_pre_hook, get_layer
from ..registry import REPAIRERS
from ..sites import Sites
from ..train import TrainConfig, fit


@dataclass
class FinetuneConfig:
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    use_pairs: bool = True        # add the cleansed twins of the evidence pairs, with their true labels
    refresh: bool = False         # adversarial training: every epoch, the evidence inputs the defect can regenerate
                                  # (adversarial examples of the pairs' clean twins) are made afresh against the model
                                  # under repair and tuned on with their true labels
    seed: int = 0
    device: str = "cpu"


def site_parameters(model: nn.Module, sites: Sites | None, example: torch.Tensor | None = None
                    ) -> tuple[list[nn.Parameter] | None, dict | None]:
    """Parameters of the sites' layers (None = all) and gradient masks for weight sites. Neuron sites on a
    weightless layer (CARE's flatten / activation units) tune the next weight layer's columns reading them."""
    if sites is None or not len(sites):
        return None, None
    params: dict[int, nn.Parameter] = {}
    masks: dict[torch.Tensor, torch.Tensor] = {}
    for layer, m in sites.masks(model, example).items():          # the weights, by the one sites-to-masks rule
        w = get_layer(model, layer).weight
        params[id(w)] = w
        masks[w] = m.to(w)
    for layer in sites.layers():            # the sites' own layers' biases: a neuron's entry, else all of it
        b = getattr(get_layer(model, layer), "bias", None)
        if b is None:
            continue
        params[id(b)] = b
        rows = [s.index for s in sites.neurons(layer) if s.index is not None]
        if rows and not any(s.layer == layer and s.kind != "neuron" for s in sites):
            mb = torch.zeros_like(b)
            mb[rows] = 1
            masks[b] = mb
    return list(params.values()), masks or None


@REPAIRERS.register("finetune", "cross-entropy fine-tuning on the clean repair data (optionally only at the sites)",
                    config=FinetuneConfig)
def finetune(model: nn.Module, defect: Defect, sites: Sites | None, cfg: FinetuneConfig) -> Edit:
    work = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    x, y = defect.tuning_set(cfg.use_pairs)
    params, masks = site_parameters(work, sites, defect.repair.x_fit)
    freeze_batchnorm(work)
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                     weight_decay=cfg.weight_decay, seed=cfg.seed)
    if cfg.refresh:
        require_capability(defect, "regenerate", "finetune with refresh")
        pairs = defect.require_pairs("finetune with refresh")
        for epoch in range(cfg.epochs):
            fresh = defect.regenerate(work, pairs.clean)
            fit(work, torch.cat([x, fresh]), torch.cat([y, pairs.labels]), dataclasses.replace(tc, epochs=1, seed=cfg.seed + epoch),
                cfg.device, desc="fine-tune", params=params, grad_mask=masks, output=defect.decision_logits)
    else:
        fit(work, x, y, tc, cfg.device, desc="fine-tune", params=params, grad_mask=masks, output=defect.decision_logits)
    work.cpu()
    names = [n for n, _ in work.named_parameters()]
    return Edit.between(before, work, {"repairer": "finetune", "samples": len(y)}, names=names)


def freeze_batchnorm(model: nn.Module) -> None:
    """Repairs never update BN running statistics: keep BN layers in eval mode during tuning."""
    def train_hook(mod, _inp):
        for m in mod.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    add_pre_hook(model, train_hook)
