"""Reproducible training of (backdoored) models: `netmend train`."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.datasets import ImageData, load_dataset, split_indices
from .data.triggers import TriggerSpec, build_trigger, poison_indices, stamp_batched
from .errors import require
from .metrics import attack_success_rate, predict
from .progress import progress
from .zoo.models import create_model


@dataclass
class TrainConfig:
    """netmend's fast recipe by default (Adam, constant step, no augmentation: small models on a CPU in minutes).
    The field's recipe for CIFAR-10 ResNets (BackdoorBench's: SGD with momentum and weight decay, a cosine schedule,
    random crop + horizontal flip) is `optimizer="sgd", weight_decay=5e-4, schedule="cosine", augment="crop-flip"`,
    with `amp=True` for bfloat16 autocast on a GPU."""
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0
    schedule: str = "constant"        # constant | cosine (annealed to 0 over all steps, per step)
    augment: str = "none"             # none | crop-flip (zero padding of an eighth of the side, random crop, flip p = ½)
    amp: bool = False                 # bfloat16 autocast of the forward pass on a CUDA device (ignored on the CPU)


# Named recipes (`netmend train --recipe`): options over TrainConfig's defaults. "field" is the recipe the backdoor
# literature trains CIFAR ResNets with (BackdoorBench's optimiser, weight decay, schedule and augmentation; the step
# and batch of a 40-epoch run).
RECIPES: dict[str, dict[str, Any]] = {
    "netmend": {},
    "field": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "batch_size": 256, "schedule": "cosine",
              "augment": "crop-flip", "amp": True},
}
SCHEDULES = ("constant", "cosine")
AUGMENTS = ("none", "crop-flip")
# The recipe keys added after the first shipped grids, with TrainConfig's defaults: a bench recipe names them only when
# they differ, so the models every earlier grid trained keep their cache keys.
RECIPE_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name in ("schedule", "augment", "amp")}


def without_recipe_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """`options` less the `RECIPE_DEFAULTS` keys at their defaults (what a grid's hash and model keys are taken of)."""
    return {k: v for k, v in options.items() if not (k in RECIPE_DEFAULTS and v == RECIPE_DEFAULTS[k])}


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """The field's CIFAR augmentation on a batch of images (N, C, H, W), each its own draw from `g`: zero-pad by
    `pad` (default an eighth of the height: CIFAR's 4 pixels of 32), crop back to H × W at a random offset, flip
    left-right with probability ½."""
    n, _c, h, w = x.shape
    pad = max(1, h // 8) if pad is None else pad
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = (dy[:, None] + torch.arange(h)).to(x.device)                     # (n, h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)     # (n, w): a flip reads the columns reversed
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def masked_step(opt: torch.optim.Optimizer, loss: torch.Tensor, grad_mask: dict | None = None,
                frozen: dict | None = None) -> None:
    """One optimiser step that moves only the entries a mask allows: gradients are masked, and the entries weight
    decay or momentum moved anyway are put back to `frozen` (their values before tuning)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_mask:
        for p, m in grad_mask.items():
            if p.grad is not None:
                p.grad.mul_(m)
    opt.step()
    if grad_mask and frozen:
        with torch.no_grad():
            for p, m in grad_mask.items():
                p.copy_(torch.where(m.bool(), p, frozen[p]))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device: str = "cpu",
        desc: str = "training", params=None, grad_mask: dict | None = None, output=None) -> nn.Module:
    """Mini-batch cross-entropy training (also used by fine-tuning). Deterministic for a seed. `output` maps the
    model's outputs to the logits the loss reads (a defect's `decision_logits`: negated for argmin networks)."""
    require(len(x) > 0, "no training data")
    model.to(device).train()
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adam"
           else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay))
    # other configs (the tabular trainer's) name only the fields they use: the rest keep netmend's fast recipe
    schedule, augment, amp = (getattr(cfg, k, RECIPE_DEFAULTS[k]) for k in ("schedule", "augment", "amp"))
    require(schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    require(augment in AUGMENTS, f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    require(augment == "none" or x.dim() == 4, "augment='crop-flip' needs images (N, C, H, W)")
    g = torch.Generator().manual_seed(cfg.seed)
    ga = torch.Generator().manual_seed(cfg.seed + 1)            # the augmentation's own stream: the order stays the same
    grad_mask = {p: m.to(p.device, p.dtype) for p, m in grad_mask.items()} if grad_mask else None
    frozen = {p: p.detach().clone() for p in grad_mask} if grad_mask else {}
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    autocast = amp and str(device).startswith("cuda")
    step = 0
    with progress(desc, total=steps) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), cfg.batch_size):
                if schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / steps))
                b = perm[i: i + cfg.batch_size]
                xb, yb = x[b].to(device), y[b].to(device)
                if augment == "crop-flip":
                    xb = crop_flip(xb, ga)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = model(xb)
                    loss = F.cross_entropy((output(out) if output is not None else out).float(), yb)
                masked_step(opt, loss, grad_mask, frozen)
                bar.advance()
                step += 1
    return model.eval()


# Architecture arguments for image models, saved in model.json's arch_args so that loading rebuilds the same net.
# The `mlp` default (64-32-16-8-4) is the fairness benchmark's tabular net: its 4-unit bottleneck cannot separate
# ten image classes (20 % accuracy on digits), so image MLPs get wider layers.
IMAGE_ARCH_ARGS: dict[str, dict[str, Any]] = {"mlp": {"hidden": [256, 128]}}


def build_image_model(arch: str, data: ImageData) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh `arch` for `data` (normalised by its channel statistics) and the model.json `arch_args` that
    rebuild it."""
    mean, std = data.channel_stats()
    kwargs = {"mean": mean, "std": std, **IMAGE_ARCH_ARGS.get(arch, {})}
    model = create_model(arch, data.in_shape, data.num_classes, **kwargs)
    return model, {"in_shape": data.in_shape, "num_classes": data.num_classes, **kwargs}


def default_epochs(arch: str, dataset: str) -> int:
    return {"digits": 30}.get(dataset, 8 if arch in ("mlp", "small-cnn") else 30)


def train_backdoored(dataset: str, arch: str, trigger: TriggerSpec | None, target: int = 0, poison_rate: float = 0.1,
                     cfg: TrainConfig | None = None, device: str = "cpu", data_dir=None, split_seed: int | None = None,
                     pool_fraction: float = 0.1, data: ImageData | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train `arch` on `dataset` with a poisoned fraction of the training split; return (model, model.json)."""
    cfg = cfg or TrainConfig(epochs=default_epochs(arch, dataset))
    data = data or load_dataset(dataset, data_dir)
    split_seed = cfg.seed if split_seed is None else split_seed
    splits = split_indices(len(data.y_train), split_seed, pool_fraction)
    tr = torch.tensor(splits["train"])
    x, y = data.x_train[tr].clone(), data.y_train[tr].clone()
    defect_info: dict[str, Any] = {"kind": "clean"}
    trig = None
    if trigger is not None:
        require(0 <= target < data.num_classes, f"--target {target} outside 0..{data.num_classes - 1}")
        trig = build_trigger(trigger, data.in_shape)
        pidx = torch.tensor(poison_indices(len(y), poison_rate, cfg.seed), dtype=torch.long)
        extra: dict[str, Any] = {}
        if hasattr(trig, "poison_training"):     # triggers with their own recipe (e.g. WaNet's noise mode)
            x, y, extra = trig.poison_training(x, y, pidx, target, cfg.seed)
        elif len(pidx):
            x[pidx] = stamp_batched(trig, x[pidx])
            y[pidx] = target
        defect_info = {"kind": "backdoor", "trigger": trigger.to_json(), "target": int(target),
                       "poison_rate": float(poison_rate), "poisoned": int(len(pidx)), **extra}
    model, arch_args, seconds = fit_image_model(data, arch, x, y, cfg, device, f"train {arch} on {dataset}")
    pred = predict(model, data.x_test)
    metrics = {"clean_accuracy": float((pred == data.y_test).float().mean())}
    if trig is not None:
        metrics["asr"] = attack_success_rate(predict(model, stamp_batched(trig, data.x_test)), data.y_test, target)
    info = model_info(dataset, data, arch, arch_args, data_dir, split_seed, pool_fraction, len(tr), defect_info, cfg,
                      seconds, device, metrics)
    return model, info


def fit_image_model(data: ImageData, arch: str, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device: str,
                    desc: str) -> tuple[nn.Module, dict[str, Any], float]:
    """A fresh `arch` seeded by cfg.seed, fitted on (x, y): (model on the CPU in eval mode, arch_args, seconds)."""
    torch.manual_seed(cfg.seed)
    model, arch_args = build_image_model(arch, data)
    t0 = time.perf_counter()
    fit(model, x, y, cfg, device, desc=desc)
    return model.cpu().eval(), arch_args, time.perf_counter() - t0


def model_info(dataset: str, data: ImageData, arch: str, arch_args: dict[str, Any], data_dir, split_seed: int,
               pool_fraction: float, n_train: int, defect: dict[str, Any], cfg: TrainConfig, seconds: float, device: str,
               metrics: dict[str, Any]) -> dict[str, Any]:
    """The model.json of a model trained here: enough to rebuild it, its data split and its defect."""
    from . import __version__

    return {
        "netmend": __version__, "arch": arch,
        "arch_args": arch_args,
        "dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "classes": data.classes,
        "split_seed": split_seed, "pool_fraction": pool_fraction, "n_train": n_train,
        "defect": defect, "training": {**asdict(cfg), "seconds": seconds, "device": device},
        "metrics": metrics,
    }
