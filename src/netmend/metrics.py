"""Batched metrics: accuracy, ASR, per-class accuracy, class-fairness gap, DER, Wilson intervals."""
from __future__ import annotations

import math

import torch
from torch import nn

from .layout import fast_layout


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024, device: str | torch.device | None = None) -> torch.Tensor:
    """argmax predictions in eval mode, batched, returned on the CPU."""
    was_training = model.training
    model.eval()
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    with fast_layout(model, x[:2], len(x)):
        out = [model(x[i: i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with fast_layout(model, x[:2], len(x)):
        out = [model(x[i: i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean()) if len(y) else float("nan")


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy of each class (NaN for a class absent from y)."""
    correct = torch.bincount(y[pred == y], minlength=num_classes).float()
    total = torch.bincount(y, minlength=num_classes).float()
    acc = correct / total.clamp_min(1)
    acc[total == 0] = float("nan")
    return acc.tolist()


def class_fairness_gap(per_class: list[float]) -> float:
    """INNER's class fairness: mean − min per-class accuracy (lower is fairer)."""
    vals = [v for v in per_class if not math.isnan(v)]
    return float(sum(vals) / len(vals) - min(vals)) if vals else float("nan")


def attack_success_rate(pred_triggered: torch.Tensor, y: torch.Tensor, target: int) -> float:
    """Share of triggered inputs classified as the target, over samples whose true class is NOT the target."""
    keep = y != target
    return float((pred_triggered[keep] == target).float().mean()) if keep.any() else float("nan")


def robust_accuracy(pred_triggered: torch.Tensor, y: torch.Tensor, target: int) -> float:
    """R-Acc: triggered non-target inputs still classified as their true label."""
    keep = y != target
    return float((pred_triggered[keep] == y[keep]).float().mean()) if keep.any() else float("nan")


def defense_effectiveness_rating(before: dict, after: dict) -> float:
    """BackdoorBench DER = [max(0, ΔASR) − max(0, ΔAcc) + 1] / 2 in [0, 1]; 0.5 is no change."""
    d_asr = max(0.0, before["asr"] - after["asr"])
    d_acc = max(0.0, before["clean_accuracy"] - after["clean_accuracy"])
    return (d_asr - d_acc + 1) / 2


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))
