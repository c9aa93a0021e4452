"""The Defect protocol: the one place that knows the task.

A defect carries the evidence (corrupted samples and their cleansed twins, ...), the clean repair
data a method may see (split into fit and validation), the held-out evaluation data it may not, and
answers `violation(model, x, y)` (differentiable, per sample) and `metrics(model)` (named figures).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import NetmendError
from .transplant import SPARSE, carried_as, carry, warp_of

_UNFITTED = object()       # Pairs._warp before the pairs' corruption was examined


def eval_count(limit: int | None, n: int) -> int:
    """How many test samples a defect measures on: `eval_limit` (a quick look) or all n of them."""
    if limit is None:
        return n
    if limit < 1:
        raise NetmendError(f"eval_limit must be ≥ 1 (leave it out to measure on all {n} test samples), got {limit}")
    return min(int(limit), n)


@dataclass
class Pairs:
    """Evidence pairs x̃ → x: corrupted inputs, their cleansed twins, true labels, optional masks (H×W)."""

    corrupted: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None
    indices: list[int] = field(default_factory=list)
    _warp: Any = field(default=_UNFITTED, init=False, repr=False, compare=False)   # see `warp`

    def __post_init__(self):
        if self.corrupted.shape != self.clean.shape:
            raise NetmendError(f"pairs: corrupted {tuple(self.corrupted.shape)} and cleansed {tuple(self.clean.shape)} shapes differ")
        if len(self.labels) != len(self.clean):
            raise NetmendError(f"pairs: {len(self.clean)} samples but {len(self.labels)} labels")
        for name, t in (("corrupted", self.corrupted), ("cleansed", self.clean)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NetmendError(f"pairs: {name} samples contain NaN or infinite values")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: torch.Tensor) -> "Pairs":
        """The pairs where `keep` (bool, one per pair) is True."""
        ids = [i for i, k in zip(self.indices, keep.tolist()) if k] if self.indices else []
        return Pairs(self.corrupted[keep], self.clean[keep], self.labels[keep],
                     self.masks[keep] if self.masks is not None else None, ids)

    def subset(self, n: int) -> "Pairs":
        masks = self.masks[:n] if self.masks is not None else None
        return Pairs(self.corrupted[:n], self.clean[:n], self.labels[:n], masks, self.indices[:n])

    def transplant(self, x: torch.Tensor, y: torch.Tensor, sparse: float = SPARSE) -> "Pairs":
        """New pairs made from other clean inputs x (labels y) carrying the pairs' corruption, cycling through them.

        The corruption is what the pairs show: x̃ − x. Where it is confined to a patch (at most `sparse` of the
        input's positions differ) the corrupted values are pasted in; a dense difference that a smooth warp of the
        images explains (WaNet) is carried as that warp, fitted once; any other dense difference (a blend) is added
        (defects/transplant.py). The result stays inside the value range of the given samples."""
        if not len(self) or not len(x):
            return Pairs(x[:0], x[:0], y[:0])
        bad = carry(self.corrupted, self.clean, x, sparse, self.warp if sparse == SPARSE else warp_of(
            self.corrupted, self.clean, sparse))
        j = torch.arange(len(x)) % len(self)
        masks = self.masks[j] if self.masks is not None else None
        return Pairs(bad, x, y, masks)

    def carried_as(self) -> str:
        """How `transplant` carries the corruption: "paste", "add", "warp (k = …, R² …)" or a mix."""
        return carried_as(self.corrupted, self.clean, self.warp)

    @property
    def warp(self):
        """The fitted warp the pairs' corruption is carried as (None: pasted or added); fitted on first use."""
        if self._warp is _UNFITTED:
            self._warp = warp_of(self.corrupted, self.clean)
        return self._warp


@dataclass
class RepairData:
    """Clean data a method may use: `fit` to change the model, `val` to decide stopping and rollback."""

    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    indices: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y_fit) + len(self.y_val)


@dataclass
class Objective:
    """What search-based repairers (CARE's PSO, ...) optimise, in a form that batches over candidates.

    `violated(logits_bad)` maps logits of `x_bad` with any leading batch dims (..., N_bad, K) to a
    bool tensor (..., M) marking the misbehaving evidence items (M may differ from N_bad, e.g. fairness
    compares an input with its flipped copies). The behaviour on `x_good` must be kept: its
    argmax should equal `y_good` (true labels, or the original model's predictions)."""

    x_bad: torch.Tensor
    violated: Callable[[torch.Tensor], torch.Tensor]
    x_good: torch.Tensor
    y_good: torch.Tensor
    decide: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits.argmax(-1)   # ACAS Xu: argmin

    def parts(self, logits_bad: torch.Tensor, logits_good: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(violation rate on x_bad, accuracy on x_good), batched over leading dims."""
        viol = self.violated(logits_bad).float().mean(-1)
        acc = (self.decide(logits_good) == self.y_good.to(logits_good.device)).float().mean(-1)
        return viol, acc

    def cost(self, logits_bad: torch.Tensor, logits_good: torch.Tensor, alpha: float) -> torch.Tensor:
        """CARE's fitness (1 − α)·violation rate + α·(1 − accuracy), batched over leading dims."""
        viol, acc = self.parts(logits_bad, logits_good)
        return (1 - alpha) * viol + alpha * (1 - acc)


@torch.no_grad()
def violated_rate(model: nn.Module, obj: Objective, batch: int = 4096) -> float:
    """Share of an objective's evidence items the model gets wrong (its `violated` over all of x_bad)."""
    was = model.training
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    logits = torch.cat([model(obj.x_bad[i: i + batch].to(dev)).float() for i in range(0, len(obj.x_bad), batch)])
    model.train(was)
    v = obj.violated(logits)
    return float(v.float().mean()) if v.numel() else 0.0


class Defect:
    """Base class. Subclasses set `kind`, fill `repair` (and `pairs` where they exist) and implement
    `violation` and `metrics`."""

    kind: str = "defect"
    repair: RepairData
    pairs: Pairs | None = None
    transplantable: bool = False      # the pairs' corruption means the same on any input (a trigger, a pattern):
                                      # methods may stamp it on repair samples to judge generalisation
    stamp_goal: str = "deny"          # what a repaired model should do with a stamped input: "deny" the class the
                                      # stamp pulls to (a backdoor) or be "invariant" to the stamp (a spurious cue)
    violation_measure: str = "target"  # INNER's violation rate on evidence: share sent to the defect's target ("target")
                                      # or share still misclassified ("misclassified", when correctness is the metric)
    decision: str = "argmax"          # how outputs become a decision: "argmax" (classifiers) or "argmin" (ACAS Xu
                                      # advisories: the lowest score wins)
    num_classes: int = 0
    in_shape: list[int] = []

    @property
    def variant(self) -> str:
        """The kind, refined where a kind has variants that methods treat apart (a trigger's kind: badnets,
        blended, wanet); methods with settings per variant (INNER's τ per attack) key them by it."""
        return self.kind

    def decision_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Outputs turned into logits whose argmax is the decision (negated for argmin networks), so
        cross-entropy pushes the decided class up whichever way the network decides."""
        return -logits if self.decision == "argmin" else logits

    def repair_estimate(self, model: nn.Module) -> float | None:
        """The defect's own metric (lower is better) estimated on the REPAIR data only, for the pairs in use, or
        None when the defect has no such estimate. Rectification drives its loop by it where no transplant probe
        applies: an edit that closes the evidence pairs' gap need not lower the metric elsewhere."""
        return None

    def tuning_set(self, use_pairs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """What gradient repairers (fine-tuning, fine-pruning, A-ClArC) train on: the clean repair fit data and,
        with `use_pairs`, the evidence pairs' cleansed twins with their true labels."""
        x, y = self.repair.x_fit, self.repair.y_fit
        if use_pairs and self.pairs is not None and len(self.pairs):
            x, y = torch.cat([x, self.pairs.clean]), torch.cat([y, self.pairs.labels])
        return x, y

    def pair_groups(self) -> list["Pairs"]:
        """The evidence pairs in groups that dynamic rectification fits one after another (default: one group).
        A defect whose pairs show the corruption in layouts that one rank-one edit cannot serve together splits
        them (leakage: by null-block position)."""
        return [self.pairs] if self.pairs is not None and len(self.pairs) else []

    def with_pairs(self, pairs: "Pairs") -> "Defect":
        """A view of this defect whose evidence pairs are `pairs` (one of `pair_groups()`), everything else shared:
        a method fitting one group passes the view on, and the defect itself never changes."""
        view = copy.copy(self)
        view.pairs = pairs
        return view

    def require_pairs(self, method: str) -> "Pairs":
        """The evidence pairs, or a one-line error that says how to get them (or that this defect has none)."""
        from .capabilities import require_capability

        require_capability(self, "pairs", method)
        return self.pairs

    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample differentiable measure of the misbehaviour on evidence inputs x (true labels y)."""
        raise NotImplementedError

    def evidence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Misbehaving inputs with the labels the repaired model should give them."""
        if self.pairs is None:
            raise NetmendError(f"{self.kind} defect has no evidence samples")
        return self.pairs.corrupted, self.pairs.labels

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Bind model-dependent evidence (e.g. discriminatory instances) before any metric is taken."""

    def objective(self, model: nn.Module) -> Objective:
        """The repair objective on the repair data (never the evaluation data)."""
        raise NotImplementedError(f"{self.kind} defect does not define a search objective")

    gate_must_clear: bool = False     # the acceptance gate also demands the defect's own check reach zero (safety)

    def gate_check(self, model: nn.Module) -> dict[str, Any]:
        """The acceptance gate's numbers (netmend.gate) on repair data no method fits on: `accuracy` (higher is
        better) and, where the defect can measure itself there, `defect` (lower is better), each with a name.
        Default: validation accuracy, and the violation rate of `validation_objective` or the `repair_estimate`."""
        out: dict[str, Any] = {"accuracy": float(self.validation_score(model)), "accuracy_name": "validation accuracy",
                               "accuracy_samples": int(len(self.repair.y_val))}
        from .capabilities import ValidationObjective

        if isinstance(self, ValidationObjective):
            obj = self.validation_objective(model)
            out.update(defect=violated_rate(model, obj), defect_name="violations on validation evidence")
        else:
            est = self.gate_estimate(model)
            if est is not None:
                out.update(defect=float(est[0]), defect_name=est[1])
        return out

    def gate_estimate(self, model: nn.Module) -> tuple[float, str] | None:
        """The gate's defect number where there is no validation objective, with its name: by default the
        `repair_estimate` (None where the defect has none). A defect whose estimate reads data a repair chooses on
        measures it here on data held apart instead."""
        est = self.repair_estimate(model)
        return None if est is None else (float(est), "the defect's estimate on repair data")

    def stamped_pull(self, model: nn.Module, cls: int) -> float:
        """Share of the validation samples of other classes that the defect's stamp sends to class `cls` (the gate's
        check for transplantable defects: a backdoor's ASR, a spurious cue's pull)."""
        from ..metrics import predict

        keep = self.repair.y_val != cls
        x = self.stamp(self.repair.x_val[keep])
        return float((predict(model, x) == cls).float().mean()) if len(x) else 0.0

    def validation_score(self, model: nn.Module) -> float:
        """Clean accuracy on the validation split of the repair data (what rollback rules look at)."""
        from ..metrics import accuracy, predict

        return accuracy(predict(model, self.repair.x_val), self.repair.y_val)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the run record (kind, sizes, indices)."""
        d = {"kind": self.kind, "repair_fit": len(self.repair.y_fit), "repair_val": len(self.repair.y_val),
             "repair_indices": self.repair.indices}
        if self.pairs is not None:
            d["pairs"] = len(self.pairs)
            d["pair_indices"] = self.pairs.indices
        return d

    def samples_used(self, uses_pairs: bool = True) -> int:
        return len(self.repair) + (len(self.pairs) if (uses_pairs and self.pairs is not None) else 0)
