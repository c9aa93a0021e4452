"""Neural Attention Distillation (Li et al., ICLR 2021): erase a backdoor by distilling a fine-tuned teacher's
attention maps into the backdoored network.

1. Teacher: a copy of the model fine-tuned with cross-entropy on the clean repair data (`teacher_epochs`).
2. Student: the backdoored model itself, trained with CE + Σ_l β_l · MSE(A_l(student), A_l(teacher)) on the same
   data, where A_l is the attention map of layer l's output a: mean over channels of |a|^p, flattened over positions
   and divided by its L2 norm (per sample).

The attention layers default to the outputs of the last `blocks` feature blocks (see `feature_blocks`); `layers` names
them instead. BackdoorBench's defaults: teacher 10 epochs, SGD lr 0.01, momentum 0.9, weight decay 1e-4, p = 2 and
β = 500 / 1000 / 1000 from the shallowest to the deepest of ResNet's three groups.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import require
from ..hooks import capture, execution_order, get_layer
from ..methods import MethodPreset
from ..progress import progress
from ..registry import METHODS, REPAIRERS
from ..sites import Sites
from ..train import TrainConfig, fit
from .finetune import freeze_batchnorm

NAD_PAPER = "Li et al., ICLR 2021"
# Modules a feature block's output may pass through and still count as the block's output (no weights, same map).
_BLOCK_TAIL = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ReLU6,
               nn.modules.batchnorm._BatchNorm, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


@dataclass
class NADConfig:
    teacher_epochs: int = 10      # epochs of CE fine-tuning that make the teacher (BackdoorBench te_epochs)
    teacher_lr: float = 0.01      # the teacher's SGD learning rate
    epochs: int = 20              # epochs of attention distillation into the student (the NAD paper's 20)
    lr: float = 0.01              # the student's SGD learning rate (momentum 0.9)
    batch_size: int = 64
    weight_decay: float = 1e-4    # BackdoorBench's NAD weight decay, teacher and student
    betas: list[float] = field(default_factory=lambda: [500.0, 1000.0, 1000.0])  # β per layer, shallow → deep
                                  # (fewer layers take the deepest values; one value applies to all)
    p: float = 2.0                # power of |a| in the attention map
    layers: list[str] | None = None   # attention layers (dotted names of modules giving N×C×… maps)
                                      # default: the outputs of the last `blocks` feature blocks
    blocks: int = 3               # how many feature blocks (from the deepest) the default layers take
    use_pairs: bool = True        # add the cleansed twins of the evidence pairs, with their true labels
    seed: int = 0
    device: str = "cpu"


def attention_map(a: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """NAD's attention map of feature maps a (N, C, ...): mean over channels of |a|^p, flattened to (N, positions)
    and divided by its L2 norm (+ eps) per sample."""
    am = a.abs().pow(p).mean(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (teacher's taken as given)."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p).detach())


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    param = next(model.parameters(), None)
    was = model.training
    model.eval()
    with capture(model, names) as cap, torch.no_grad():
        model(x[:2].to(param.device) if param is not None else x[:2])
    model.train(was)
    return {n: v for n, v in cap.outputs.items() if torch.is_tensor(v)}


def _is_map(out: torch.Tensor | None, n: int) -> bool:
    """A batch of feature maps with more than one position: (n, C, d1, ...) with d1·… > 1."""
    return out is not None and out.dim() >= 3 and out.shape[0] == n and out[0, 0].numel() > 1


def feature_blocks(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Dotted names of the outputs of the model's feature blocks, shallow to deep.

    The convolutions (in execution order) are grouped by the child of the shallowest module whose children
    separate them (ResNet: conv1, layer1..layer4; a Sequential CNN: each conv). A block's output is its child's,
    carried on through the weightless children that follow it (activation, batch norm, pooling) while they still
    give feature maps with more than one position; blocks that do not give such maps are left out."""
    convs = [n for n in execution_order(model, x) if isinstance(get_layer(model, n), nn.Conv2d)]
    if not convs:
        return []
    prefix = ""
    while True:
        parent = get_layer(model, prefix) if prefix else model
        heads = list(dict.fromkeys(n[len(prefix):].split(".")[0] for n in convs))
        child = get_layer(parent, heads[0])
        if len(heads) == 1 and next(iter(child.children()), None) is not None:
            prefix = f"{prefix}{heads[0]}."
            continue
        break
    children = [n for n, _ in parent.named_children()]
    outs = _outputs(model, [prefix + c for c in children], x)
    n = min(len(x), 2)
    blocks = []
    for head in heads:
        name = prefix + head
        i = children.index(head)
        for nxt in children[i + 1:]:
            if not isinstance(get_layer(parent, nxt), _BLOCK_TAIL) or not _is_map(outs.get(prefix + nxt), n):
                break
            name = prefix + nxt
        if _is_map(outs.get(name), n) and name not in blocks:
            blocks.append(name)
    return blocks


def attention_layers(model: nn.Module, x: torch.Tensor, cfg: NADConfig) -> tuple[list[str], list[float]]:
    """The attention layers (cfg.layers, checked, or the last cfg.blocks feature blocks) and their β."""
    require(cfg.blocks >= 1, f"NAD: blocks must be ≥ 1, got {cfg.blocks}")
    require(len(cfg.betas) > 0 and all(b >= 0 for b in cfg.betas), f"NAD: betas must be ≥ 0 numbers, got {cfg.betas}")
    require(cfg.p > 0, f"NAD: p must be > 0, got {cfg.p}")
    if cfg.layers:
        known = {n for n, _ in model.named_modules() if n}
        for name in cfg.layers:
            require(name in known, f"NAD: layer {name!r} does not exist in the model; feature blocks: "
                                   f"{', '.join(feature_blocks(model, x)) or 'none'}")
        outs = _outputs(model, list(cfg.layers), x)
        for name in cfg.layers:
            out = outs.get(name)
            require(out is not None, f"NAD: layer {name!r} is not run by the model's forward pass")
            require(_is_map(out, min(len(x), 2)), f"NAD: layer {name!r} gives shape {tuple(out.shape)}, not feature "
                                                 "maps (N, C, H, ...) with more than one position")
        layers = list(dict.fromkeys(cfg.layers))
    else:
        layers = feature_blocks(model, x)[-cfg.blocks:]
        require(bool(layers), "NAD needs a convolutional network: no Conv2d feature block gives feature maps "
                              "(name attention layers with -R layers=...)")
    betas = [float(b) for b in cfg.betas]
    if len(betas) == 1:
        betas = betas * len(layers)
    require(len(betas) >= len(layers), f"NAD: {len(layers)} attention layers but only {len(betas)} betas")
    return layers, betas[len(betas) - len(layers):]


@torch.no_grad()
def _teacher_maps(teacher: nn.Module, layers: list[str], x: torch.Tensor, p: float, device: str,
                  chunk: int = 512) -> dict[str, torch.Tensor]:
    teacher.eval()
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    with capture(teacher, layers) as cap:
        for i in range(0, len(x), chunk):
            teacher(x[i: i + chunk].to(device))
            for n in layers:
                parts[n].append(attention_map(cap.outputs[n], p))
    return {n: torch.cat(v) for n, v in parts.items()}


@REPAIRERS.register("nad", "Neural Attention Distillation: fine-tune a teacher copy on clean data, then train the "
                    "model with CE + β · attention-map distance to the teacher", config=NADConfig)
def nad(model: nn.Module, defect: Defect, sites: Sites | None, cfg: NADConfig) -> Edit:
    require(sites is None or not len(sites), "NAD tunes the whole network; it takes no localiser")
    work = copy.deepcopy(model).to(cfg.device).eval()
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    x, y = defect.tuning_set(cfg.use_pairs)
    require(len(x) > 0, "NAD: no clean repair data to tune on")
    layers, betas = attention_layers(work, defect.repair.x_fit[:2] if len(defect.repair.x_fit) else x[:2], cfg)

    teacher = copy.deepcopy(work)
    freeze_batchnorm(teacher)
    if cfg.teacher_epochs > 0:
        fit(teacher, x, y, TrainConfig(cfg.teacher_epochs, cfg.batch_size, cfg.teacher_lr, cfg.weight_decay, "sgd",
                                       cfg.seed), cfg.device, desc="NAD: teacher", output=defect.decision_logits)
    targets = _teacher_maps(teacher, layers, x, cfg.p, cfg.device)
    del teacher

    freeze_batchnorm(work)
    work.train()
    opt = torch.optim.SGD([p for p in work.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9,
                          weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    ce_sum = at_sum = 0.0
    seen = 0
    with capture(work, layers, detach=False) as cap, progress("NAD: distil", total=steps) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=g)
            ce_sum = at_sum = 0.0
            seen = 0
            for i in range(0, len(x), cfg.batch_size):
                b = perm[i: i + cfg.batch_size]
                xb, yb = x[b].to(cfg.device), y[b].to(cfg.device)
                ce = F.cross_entropy(defect.decision_logits(work(xb)), yb)
                at = sum(beta * F.mse_loss(attention_map(cap.outputs[n], cfg.p), targets[n][b.to(targets[n].device)])
                         for n, beta in zip(layers, betas))
                loss = ce + at
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum += float(ce.detach()) * len(b)
                at_sum += float(at.detach()) * len(b)
                seen += len(b)
                bar.advance()
    work.cpu().eval()
    names = [n for n, _ in work.named_parameters()]
    meta = {"repairer": "nad", "samples": len(y), "layers": layers, "betas": betas,
            "last_epoch_ce": ce_sum / max(seen, 1), "last_epoch_attention_loss": at_sum / max(seen, 1)}
    return Edit.between(before, work, meta, names=names)


METHODS.add("nad", MethodPreset(None, "nad", paper=NAD_PAPER),
            "Neural Attention Distillation: distil a clean-fine-tuned teacher's attention maps into the model")
