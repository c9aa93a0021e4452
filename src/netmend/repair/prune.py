"""Fine-pruning (Liu et al. 2018): prune the units feeding the head that are most dormant on clean
data, as far as validation accuracy allows, then fine-tune with the pruned units held at zero."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import NetmendError
from ..hooks import get_layer
from ..metrics import accuracy, predict
from ..registry import REPAIRERS
from ..sites import Sites
from ..train import TrainConfig, fit
from .finetune import freeze_batchnorm


@dataclass
class FinePruneConfig:
    step: float = 0.01            # fraction of units pruned per step (BackdoorBench once_prune_ratio)
    max_acc_drop: float = 0.10    # relative drop of validation accuracy allowed (BackdoorBench acc_ratio)
    max_ratio: float = 0.95
    finetune_epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"


def _prune_columns(layer: nn.Module, units: list[int]) -> None:
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.weight[:, units] = 0
        elif isinstance(layer, nn.Conv2d):
            layer.weight[:, units] = 0
        else:
            raise NetmendError(f"fine-pruning needs a Linear or Conv2d layer, got {type(layer).__name__}")


@REPAIRERS.register("prune", "prune dormant units feeding a layer, then fine-tune (fine-pruning)", config=FinePruneConfig,
                    needs=("argmax",))
def fine_prune(model: nn.Module, defect: Defect, sites: Sites, cfg: FinePruneConfig) -> Edit:
    if sites is None or not sites.neurons():
        raise NetmendError("fine-pruning needs neuron sites (use the 'dormant' localiser)")
    layer_name = sites.neurons()[0].layer
    order = [s.index for s in sites.neurons(layer_name)]
    work = copy.deepcopy(model).eval()
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    layer = get_layer(work, layer_name)
    base = accuracy(predict(work, defect.repair.x_val), defect.repair.y_val)
    n = len(order)
    step = max(1, int(round(cfg.step * n)))
    pruned: list[int] = []
    w0 = layer.weight.detach().clone()
    for k in range(step, int(cfg.max_ratio * n) + 1, step):
        _prune_columns(layer, order[:k])
        acc = accuracy(predict(work, defect.repair.x_val), defect.repair.y_val)
        if acc < base * (1 - cfg.max_acc_drop):
            with torch.no_grad():
                layer.weight.copy_(w0)
            _prune_columns(layer, pruned) if pruned else None
            break
        pruned = order[:k]
    mask = torch.ones_like(layer.weight)
    if pruned:
        mask[:, pruned] = 0
    if cfg.finetune_epochs > 0:
        x, y = defect.tuning_set(True)
        freeze_batchnorm(work)
        fit(work, x, y, TrainConfig(cfg.finetune_epochs, cfg.batch_size, cfg.lr, 5e-4, "sgd", cfg.seed), cfg.device,
            desc="fine-pruning: tune", grad_mask={layer.weight: mask})
        work.cpu()
    names = [n for n, _ in work.named_parameters()]
    return Edit.between(before, work, {"repairer": "prune", "layer": layer_name, "pruned_units": pruned,
                                       "pruned_fraction": len(pruned) / max(1, n)}, names=names)
