"""Adversarial defect (INNER's `adv` scenario; docs/defects.md): targeted L∞ attacks succeed.

Evidence: successful targeted FGSM/PGD examples of held-out repair-pool samples, against the model
being repaired, with their true labels. Metrics attack the test samples *afresh* against the model
measured (the repaired one after a repair), so a repair cannot win by memorising fixed examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import ImageData, load_dataset, split_indices
from ..errors import NetmendError, require
from ..metrics import class_fairness_gap, per_class_accuracy, predict
from ..registry import DEFECTS
from .backdoor import make_repair_data
from .base import Defect, Objective, Pairs, eval_count


class Attack:
    """Targeted L∞ attack in pixel space [0, 1]: batching, device and eval mode here; `perturb` per attack."""

    def __init__(self, eps: float, target: int, steps: int = 10, step_size: float | None = None, seed: int = 0):
        require(0 < eps <= 1, f"attack eps must be in (0, 1] (pixel scale), got {eps}")
        require(steps >= 1, f"attack steps must be ≥ 1, got {steps}")
        require(step_size is None or step_size > 0, f"attack step_size must be > 0, got {step_size}")
        self.eps, self.target, self.steps, self.seed = float(eps), int(target), int(steps), int(seed)
        self.step_size = float(step_size) if step_size is not None else self.eps / 4

    def __call__(self, model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        require(x.is_floating_point(), "attack inputs must be float images in [0, 1]")
        was = model.training
        model.eval()
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for i in range(0, len(x), batch):
            xb = x[i: i + batch].to(dev)
            out.append(self.perturb(model, xb, torch.full((len(xb),), self.target, device=dev), g).detach().cpu())
        model.train(was)
        return torch.cat(out) if out else x.clone()

    def _grad(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(F.cross_entropy(model(x), t), x)[0]

    def perturb(self, model, x, t, g) -> torch.Tensor:
        raise NotImplementedError


class FGSM(Attack):
    """One step towards the target: x − ε·sign(∇ CE(f(x), t))."""

    def perturb(self, model, x, t, g):
        return (x - self.eps * self._grad(model, x, t).sign()).clamp(0, 1)


class PGD(Attack):
    """`steps` signed steps towards the target from a seeded random start, projected on the ε-ball."""

    def perturb(self, model, x, t, g):
        start = (torch.rand(x.shape, generator=g) * 2 - 1).to(x.device) * self.eps
        adv = (x + start).clamp(0, 1)
        for _ in range(self.steps):
            adv = adv - self.step_size * self._grad(model, adv, t).sign()
            adv = torch.min(torch.max(adv, x - self.eps), x + self.eps).clamp(0, 1)
        return adv


ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD}


def build_attack(name: str, eps: float, target: int, steps: int = 10, step_size: float | None = None, seed: int = 0) -> Attack:
    if name not in ATTACKS:
        raise NetmendError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](eps, target, steps, step_size, seed)


@dataclass
class AdversarialOptions:
    pairs: int = 200                  # successful adversarial examples of held-out repair samples (evidence)
    repair_fraction: float = 0.05
    val_fraction: float = 0.2
    seed: int = 0
    attack: str = "fgsm"              # fgsm | pgd
    eps: float = 0.1                  # L∞ radius in pixel units (INNER: 0.1)
    target: int = 0
    steps: int = 10                   # PGD
    step_size: float | None = None    # PGD; default eps/4
    eval_limit: int | None = None


class AdversarialDefect(Defect):
    kind = "adversarial"
    violation_measure = "misclassified"      # the metric is robust accuracy, not only the target rate

    def __init__(self, data: ImageData, splits: dict[str, list[int]], options: AdversarialOptions | None = None,
                 model: nn.Module | None = None):
        o = options or AdversarialOptions()
        require(0 <= o.target < data.num_classes, f"attack target {o.target} outside 0..{data.num_classes - 1}")
        require(o.pairs >= 1, f"--pairs must be ≥ 1 for adversarial evidence, got {o.pairs}")
        self.data, self.options, self.target = data, o, int(o.target)
        self.attack = build_attack(o.attack, o.eps, o.target, o.steps, o.step_size, o.seed)
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        self.repair, self._rest = make_repair_data(data.x_train, data.y_train, splits["repair_pool"], len(data.y_train),
                                                   o.repair_fraction, o.val_fraction, o.seed)
        n = eval_count(o.eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:n], data.y_test[:n]
        self._pairs: Pairs | None = None
        if model is not None:
            self.prepare(model)

    @property
    def pairs(self) -> Pairs:
        if self._pairs is None:
            raise NetmendError("adversarial defect has no evidence yet: call defect.prepare(model) first")
        return self._pairs

    def prepare(self, model: nn.Module) -> None:
        """Attack held-out pool samples (non-target, correctly classified) and keep the successes."""
        if self._pairs is not None:
            return
        idx = [i for i in self._rest if int(self.data.y_train[i]) != self.target]
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        ok = predict(model, x) == y
        x, y, idx = x[ok], y[ok], [i for i, k in zip(idx, ok.tolist()) if k]
        adv = self.attack(model, x)
        hit = predict(model, adv) == self.target
        if not hit.any():
            raise NetmendError(f"{self.options.attack} with eps {self.options.eps} fooled no sample: nothing to repair")
        n = self.options.pairs
        self._pairs = Pairs(adv[hit][:n], x[hit][:n], y[hit][:n], None, [i for i, k in zip(idx, hit.tolist()) if k][:n])
        self.attack_success_on_pool = float(hit.float().mean())

    def regenerate(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Fresh adversarial examples of clean inputs against `model` as it is now: a repair that tunes
        against them does adversarial training, since the metric attacks the repaired model afresh."""
        return self.attack(model, x)

    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Probability mass on the attack target (differentiable)."""
        return F.softmax(model(x), dim=1)[:, self.target]

    def objective(self, model: nn.Module) -> Objective:
        x_bad, y_bad = self.pairs.corrupted, self.pairs.labels

        def violated(logits: torch.Tensor) -> torch.Tensor:
            return logits.argmax(-1) != y_bad.to(logits.device)

        return Objective(x_bad, violated, self.repair.x_fit, self.repair.y_fit)

    def gate_check(self, model: nn.Module) -> dict[str, Any]:
        """Validation accuracy and the success of a fresh attack on the validation samples (non-target)."""
        out = super().gate_check(model)
        keep = self.repair.y_val != self.target
        x = self.repair.x_val[keep]
        hit = predict(model, self.attack(model, x)) == self.target if len(x) else torch.zeros(0, dtype=torch.bool)
        out.update(defect=float(hit.float().mean()) if len(x) else 0.0,
                   defect_name="attack success on validation samples (fresh attack)")
        return out

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        pred = predict(model, self.x_test)
        keep = self.y_test != self.target
        adv = self.attack(model, self.x_test[keep])          # fresh, against the model measured
        pa, ya = predict(model, adv), self.y_test[keep]
        pca = per_class_accuracy(pred, self.y_test, self.num_classes)
        return {"clean_accuracy": float((pred == self.y_test).float().mean()),
                "robust_accuracy": float((pa == ya).float().mean()),
                "asr": float((pa == self.target).float().mean()),
                "class_fairness_gap": class_fairness_gap(pca), "per_class_accuracy": pca,
                "n_test": int(len(self.y_test)), "n_attacked": int(keep.sum())}

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "repair_fit": len(self.repair.y_fit), "repair_val": len(self.repair.y_val),
             "repair_indices": self.repair.indices, "dataset": self.data.name, "attack": self.options.attack,
             "eps": self.options.eps, "target": self.target, "steps": self.options.steps, "n_test": int(len(self.y_test))}
        if self._pairs is not None:
            d.update({"pairs": len(self._pairs), "pair_indices": self._pairs.indices})
        return d

    def samples_used(self, uses_pairs: bool = True) -> int:
        return len(self.repair) + (len(self._pairs) if (uses_pairs and self._pairs is not None) else 0)


@DEFECTS.register("adversarial", "targeted L∞ adversarial examples (FGSM / PGD) flip predictions to a target class",
                  config=AdversarialOptions, needs_model=True)
def adversarial_from_info(info: dict, options: AdversarialOptions, data_dir=None, data: ImageData | None = None,
                          model: nn.Module | None = None) -> AdversarialDefect:
    """Same dataset and split as the model folder; evidence is made against `model` (now or at prepare)."""
    data = data or load_dataset(info["dataset"], data_dir or info.get("data_dir"))
    splits = split_indices(len(data.y_train), info["split_seed"], info.get("pool_fraction", 0.1))
    return AdversarialDefect(data, splits, options, model)
