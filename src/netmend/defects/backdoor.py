"""Backdoor (neural Trojan) defect: triggered inputs are pulled to a target class.

Evidence: n pairs (x̃ = stamp(x), x) drawn from the clean repair pool's non-target samples — those whose stamped
twin the model sends to the target first (`prepare`): evidence is an observed failure, as a user's would be.
Metrics on the untouched test set: clean accuracy, ASR (non-target samples only), R-Acc,
per-class accuracy and the class-fairness gap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import ImageData, load_dataset, split_indices
from ..data.triggers import Trigger, TriggerSpec, build_trigger, stamp_batched
from ..errors import NetmendError, require
from ..metrics import (attack_success_rate, class_fairness_gap, per_class_accuracy, predict, robust_accuracy)
from ..registry import DEFECTS
from .base import Defect, Objective, Pairs, RepairData, eval_count


@dataclass
class BackdoorOptions:
    """How much of the clean repair pool a method sees, and how many evidence pairs."""

    pairs: int = 1
    repair_fraction: float = 0.05     # fraction of the training-set size, drawn from the held-out pool
    val_fraction: float = 0.2         # of the repair data, kept for stopping / rollback decisions
    seed: int = 0
    eval_limit: int | None = None     # cap on test samples evaluated (None = all)
    pairs_that_fire: bool = True      # prefer candidates whose stamped twin the model sends to the target
    pairs_only: bool = False          # empty the repair fit split: a method fits on the pairs' clean twins alone
                                      # (the validation split stays, for the acceptance gate)


def make_repair_data(x: torch.Tensor, y: torch.Tensor, pool: list[int], n_train_total: int, fraction: float,
                     val_fraction: float, seed: int) -> tuple[RepairData, list[int]]:
    """Draw the repair subset from the held-out pool; return it and the pool indices left over."""
    require(0 < fraction <= 1, f"repair fraction must be in (0, 1], got {fraction}")
    require(0 < val_fraction < 1, f"val_fraction must be in (0, 1): the repair data is split fit / validation, "
                                  f"got {val_fraction}")
    n = max(2, int(round(fraction * n_train_total)))
    require(n <= len(pool), f"repair fraction {fraction} asks for {n} samples but the held-out pool has {len(pool)}")
    g = torch.Generator().manual_seed(int(seed) + 101)
    order = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
    chosen, rest = order[:n], order[n:]
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))      # both splits non-empty
    fit, val = sorted(chosen[n_val:]), sorted(chosen[:n_val])
    return RepairData(x[fit], y[fit], x[val], y[val], {"fit": fit, "val": val}), rest


class BackdoorDefect(Defect):
    kind = "backdoor"
    transplantable = True

    @property
    def variant(self) -> str:
        return self.trigger.spec.kind

    def __init__(self, data: ImageData, splits: dict[str, list[int]], trigger: Trigger, target: int,
                 options: BackdoorOptions | None = None):
        o = options or BackdoorOptions()
        require(0 <= target < data.num_classes, f"target class {target} outside 0..{data.num_classes - 1}")
        require(o.pairs >= 0, f"--pairs must be ≥ 0, got {o.pairs}")
        self.data, self.trigger, self.target, self.options = data, trigger, int(target), o
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        n_total = len(data.y_train)
        self.repair, rest = make_repair_data(data.x_train, data.y_train, splits["repair_pool"], n_total,
                                             o.repair_fraction, o.val_fraction, o.seed)
        if o.pairs_only:
            require(o.pairs > 0, "pairs_only needs evidence pairs to fit on: set pairs ≥ 1")
            r = self.repair
            self.repair = RepairData(r.x_fit[:0], r.y_fit[:0], r.x_val, r.y_val, {"fit": [], "val": r.indices["val"]})
        candidates = [i for i in rest if int(data.y_train[i]) != self.target]
        if len(candidates) < o.pairs:   # a small pool: allow overlap with the repair data
            used = set(rest)
            candidates += [i for i in self.repair.indices["fit"] + self.repair.indices["val"]
                           if int(data.y_train[i]) != self.target and i not in used]
        if o.pairs > len(candidates):
            raise NetmendError(f"--pairs {o.pairs} is more than the {len(candidates)} non-target samples available for pairs")
        self._candidates = candidates
        self.pairs = self._pairs_of(candidates[: o.pairs])
        self.pairs_firing: int | None = None       # how many of the pairs fire on the model (`prepare`)
        n = eval_count(o.eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:n], data.y_test[:n]
        self._x_test_triggered = stamp_batched(trigger, self.x_test)

    def _pairs_of(self, idx: list[int]) -> Pairs:
        clean = self.data.x_train[idx]
        masks = self.trigger.mask.expand(len(idx), *self.trigger.mask.shape).clone()
        return Pairs(self.trigger.apply(clean), clean, self.data.y_train[idx], masks, list(idx))

    def prepare(self, model: nn.Module) -> None:
        """Choose the evidence pairs among the candidates whose stamped twin `model` sends to the target, in the
        seeded candidate order; where too few fire, the first others fill the rest.

        Why: a pair whose stamp the model ignores shows no backdoor. A backdoor that fires on a fifth of the
        stamped images (SIG at a low amplitude) otherwise hands rectify pairs that show nothing, and it makes no
        edit. A user holding evidence holds inputs on which the model failed. Only repair-pool samples are looked
        at, never the evaluation data."""
        o = self.options
        if not o.pairs:
            return
        if not o.pairs_that_fire:
            self.pairs_firing = int((predict(model, self.pairs.corrupted) == self.target).sum())
            return
        chosen: list[int] = []
        step = max(256, 4 * o.pairs)
        for start in range(0, len(self._candidates), step):
            block = self._candidates[start: start + step]
            fires = predict(model, self.trigger.apply(self.data.x_train[block])) == self.target
            chosen += [i for i, f in zip(block, fires.tolist()) if f]
            if len(chosen) >= o.pairs:
                break
        self.pairs_firing = min(len(chosen), o.pairs)
        taken = set(chosen)
        rest = [i for i in self._candidates[: 2 * o.pairs + len(taken)] if i not in taken]
        picked = chosen[: o.pairs] + rest[: o.pairs - self.pairs_firing]
        if picked != list(self.pairs.indices):  # the same choice keeps the same Pairs: views taken of it stay valid
            self.pairs = self._pairs_of(picked)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger itself (methods that use it beyond the pairs must count the samples they stamp)."""
        return self.trigger.apply(x)

    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Probability mass on the target class for triggered inputs (differentiable)."""
        return F.softmax(model(x), dim=1)[:, self.target]

    def objective(self, model: nn.Module) -> Objective:
        """CARE's backdoor objective: triggered fit samples (non-target) must not leave their true label;
        clean fit samples must keep theirs. The trigger is stamped on the repair data only."""
        keep = self.repair.y_fit != self.target
        x_bad, y_bad = self.stamp(self.repair.x_fit[keep]), self.repair.y_fit[keep]

        def violated(logits: torch.Tensor) -> torch.Tensor:
            return logits.argmax(-1) != y_bad.to(logits.device)

        return Objective(x_bad, violated, self.repair.x_fit, self.repair.y_fit)

    def gate_check(self, model: nn.Module) -> dict[str, Any]:
        """Validation accuracy and the ASR of the validation samples (non-target) carrying the stamp."""
        return {**super().gate_check(model), "defect": self.stamped_pull(model, self.target),
                "defect_name": "ASR on stamped validation samples"}

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        pred = predict(model, self.x_test)
        pred_t = predict(model, self._x_test_triggered)
        pca = per_class_accuracy(pred, self.y_test, self.num_classes)
        return {
            "clean_accuracy": float((pred == self.y_test).float().mean()),
            "asr": attack_success_rate(pred_t, self.y_test, self.target),
            "robust_accuracy": robust_accuracy(pred_t, self.y_test, self.target),
            # the same rate without the trigger: ordinary confusion into the target, the ASR a model with no
            # backdoor shows; an ASR below it means stamped inputs are pushed away from the target (over-correction)
            "asr_clean": attack_success_rate(pred, self.y_test, self.target),
            "class_fairness_gap": class_fairness_gap(pca),
            "per_class_accuracy": pca,
            "n_test": int(len(self.y_test)),
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"dataset": self.data.name, "target": self.target, "trigger": self.trigger.spec.to_json(),
                  "n_test": int(len(self.y_test))})
        if getattr(self, "pairs_firing", None) is not None:       # EvidenceBackdoor: the user chose the pairs
            d["pairs_firing"] = self.pairs_firing
        return d


@DEFECTS.register("backdoor", "triggered inputs are classified as a target class", config=BackdoorOptions)
def backdoor_from_info(info: dict, options: BackdoorOptions, data_dir=None, data: ImageData | None = None) -> BackdoorDefect:
    """Rebuild a model folder's backdoor defect from its model.json (dataset, split, trigger, target)."""
    d = info["defect"]
    data = data or load_dataset(info["dataset"], data_dir or info.get("data_dir"))
    splits = split_indices(len(data.y_train), info["split_seed"], info.get("pool_fraction", 0.1))
    trigger = build_trigger(TriggerSpec.from_json(d["trigger"]), data.in_shape)
    return BackdoorDefect(data, splits, trigger, d["target"], options)
