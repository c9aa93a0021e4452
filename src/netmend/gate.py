"""The acceptance gate: repair → check → record. A candidate that makes things worse is not a repair.

After any method, the defect measures two numbers on repair data no method fits on (`Defect.gate_check`:
the validation split, stamped or attacked afresh, or fresh samples of a property): the defect itself (lower
is better) and accuracy (fidelity for safety). The candidate is rejected when the defect got worse than
before, when accuracy fell by more than the budget, when the defect demands it be cleared and it is not
(safety: the falsifier must find nothing), or when its outputs are not finite. The gate lives in the flow
(`api.repair`), not in any method, so every method — and every mix of localiser and repairer — passes it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .defects.base import Defect
from .editing import content_digest

DEFAULT_MAX_ACCURACY_DROP = 0.01       # one point


@dataclass
class GateResult:
    accepted: bool
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]
    max_accuracy_drop: float
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())


def _pts(v: float) -> str:
    return f"{100 * v:.2f}"


def model_digest(model: nn.Module) -> str:
    """A BLAKE2 digest of every parameter and buffer (names, shapes, dtypes, bytes): the same for two models that
    compute the same function with the same weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{content_digest(t)}".encode())
    return h.hexdigest()


def gate_before(defect: Defect, original: nn.Module) -> dict[str, Any]:
    """`defect.gate_check(original)`, kept on the defect per model content: a benchmark or a user comparing several
    methods repairs one model with one defect again and again, and for some defects the check is the costly part
    (feature leakage: an IG pass over the repair images)."""
    key = model_digest(original)
    memo = defect.__dict__.setdefault("_gate_before", {})
    if key not in memo:
        memo.clear()                     # one model at a time: a benchmark moves on to the next seed's
        memo[key] = defect.gate_check(original)
    return dict(memo[key])


def check(defect: Defect, original: nn.Module, candidate: nn.Module, max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
          before: dict[str, Any] | None = None) -> GateResult:
    """Accept or reject `candidate` against `original` on the defect's gate data."""
    before = before if before is not None else gate_before(defect, original)
    if not _finite(candidate):
        return GateResult(False, "the candidate has NaN or infinite weights", before, {}, max_accuracy_drop)
    after = defect.gate_check(candidate)
    checks, reasons = [], []
    if any(isinstance(v, float) and math.isnan(v) for v in after.values()):
        reasons.append("the candidate's outputs are not finite on the gate data")
    name = before.get("defect_name")
    if name is not None:
        b, a = before["defect"], after["defect"]
        show = (lambda v: f"{v:g}") if before.get("defect_unit") == "count" else (lambda v: f"{_pts(v)} %")
        checks.append(f"{name}: {show(b)} → {show(a)}")
        if a > b + 1e-12:
            reasons.append(f"{name} got worse on data the repair did not fit ({show(b)} → {show(a)})")
        if defect.gate_must_clear and a > 0:
            reasons.append(f"{name} is not cleared ({a:.4g} left; a {defect.kind} repair must leave none)")
    b, a = before["accuracy"], after["accuracy"]
    checks.append(f"{before['accuracy_name']}: {_pts(b)} → {_pts(a)} %")
    if b - a > max_accuracy_drop + 1e-9:
        n = before.get("accuracy_samples")
        grain = (f"; one of its {n} samples is {_pts(1 / n)} points: give more clean data or raise --max-accuracy-drop"
                 if n and 1 / n > max_accuracy_drop else "")
        reasons.append(f"{before['accuracy_name']} fell by {_pts(b - a)} points on data the repair did not fit "
                       f"({_pts(b)} → {_pts(a)} %; budget {_pts(max_accuracy_drop)}{grain})")
    return GateResult(not reasons, "; ".join(reasons), before, after, max_accuracy_drop, checks)
