"""Certified repair of a safety property: repair → verify → add what the verifier found → repair again.

Sampling and a falsifier are evidence, not proof. With `certify`, every candidate a repair produces is handed to
the complete verifier (netmend.verify). Verified: done. Violated: the verifier's counterexample and a small cloud of
box points around it join the defect's evidence, and the repair starts again from the input model. The loop stops
when a candidate is verified or the rounds run out; a candidate that is not verified is rejected like any candidate
the gate rejects (the input model comes back), with the reason and the time split recorded.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from .errors import NetmendError, require
from .progress import log, stage


def _candidate(result, model: nn.Module) -> nn.Module:
    """The model the repair produced, whether or not the gate accepted it."""
    if result.accepted or result.candidate_edit is None or result.edit is result.candidate_edit:
        return result.model
    cand = copy.deepcopy(model).cpu().eval()
    result.candidate_edit.apply(cand)
    return cand


def _cloud(x: torch.Tensor, prop, n: int, radius: float, seed: int) -> torch.Tensor:
    """x and n points around it inside its box (radius: a share of each box side), so the next repair fixes a
    neighbourhood, not a single point."""
    lo = torch.stack([b[0] for b in prop.boxes]).amin(0)
    hi = torch.stack([b[1] for b in prop.boxes]).amax(0)
    g = torch.Generator().manual_seed(int(seed))
    pts = x.view(1, -1) + radius * (hi - lo) * (2 * torch.rand(n, x.numel(), generator=g) - 1)
    pts = torch.minimum(torch.maximum(pts, lo), hi)
    pts = pts[prop.in_box(pts)]
    return torch.cat([x.view(1, -1).float(), pts.float()])


def certified_repair(model: nn.Module, defect, rounds: int = 3, verify_timeout: float = 60.0, cloud: int = 64,
                     radius: float = 0.01, keep_rejected: bool = False, **repair_kwargs: Any):
    """`api.repair` in a loop with the verifier; the result says `verified` and how the time was spent."""
    from . import api
    from .defects.capabilities import EvidenceRounds, PropertyRegion
    from .verify import verify

    require(isinstance(defect, EvidenceRounds) and isinstance(defect, PropertyRegion),
            f"--certify proves safety properties; a {defect.kind} defect has none to prove")
    require(rounds >= 0, f"certify rounds must be ≥ 0, got {rounds}")
    require(verify_timeout > 0, f"the verifier's timeout must be positive, got {verify_timeout}")
    history: list[dict[str, Any]] = []
    t_repair = t_verify = 0.0

    def check(net: nn.Module, what: str, seed: int):
        nonlocal t_verify
        t0 = time.perf_counter()
        with stage(f"certify: verifying {what}"):
            v = verify(net, defect.prop, timeout=verify_timeout, seed=seed)
        t_verify += time.perf_counter() - t0
        return v

    def add_evidence(v, seed: int) -> int:
        return defect.add_counterexamples(_cloud(v.counterexample.flatten(), defect.prop, cloud, radius, seed))

    if len(defect.x_bad) == 0:
        # The falsifier found nothing, yet the property may be violated (a counterexample in a thin region):
        # the verifier decides, and its counterexample becomes the evidence the repair fits.
        v = check(model, "the input model (no sampled counterexample)", 0)
        history.append({"round": "input", "status": v.status, "verify_seconds": round(v.seconds, 3), "boxes": v.boxes})
        if v.status != "violated":
            raise NetmendError(f"nothing to repair: the falsifier found no counterexample to {defect.prop.name} and the "
                               f"verifier says {v.status}" + (" (the property holds)" if v.status == "verified" else
                                                             f" after {verify_timeout:g} s"))
        history[-1]["added"] = add_evidence(v, 0)
    before = None
    result, status, repairs = None, "unknown", 0
    for r in range(rounds + 1):
        result = api.repair(model, defect, before=before, keep_rejected=True, **repair_kwargs)
        before = result.before
        t_repair += result.seconds
        repairs += 1
        v = check(_candidate(result, model), f"the candidate of round {r}", r)
        status = v.status
        entry = {"round": r, "status": v.status, "gate_accepted": result.accepted, "repair_seconds": result.seconds,
                 "verify_seconds": round(v.seconds, 3), "boxes": v.boxes, "evidence": int(len(defect.x_bad))}
        history.append(entry)
        log.info("certify round %d: %s (%d sub-boxes, %.1f s)", r, v.status, v.boxes, v.seconds)
        if v.status != "violated" or r == rounds:
            break
        entry["added"] = add_evidence(v, r)
    assert result is not None
    verified = status == "verified"
    result.after = {**result.after, "verified": verified, "verify_status": status}
    result.config["certify"] = {"rounds": history, "repair_seconds": round(t_repair, 3),
                                "verify_seconds": round(t_verify, 3), "verify_timeout": verify_timeout}
    result.certify = result.config["certify"]
    if not verified:
        why = (f"not verified after {repairs} repair(s): the verifier says {status}"
               + (" (a counterexample remains)" if status == "violated" else " at the timeout"))
        reason = "; ".join(r for r in [(result.gate or {}).get("reason", ""), why] if r)
        result.gate = {**(result.gate or {}), "accepted": False, "reason": reason,
                       "checks": list((result.gate or {}).get("checks", [])) + [f"verifier: {status}"]}
        if result.accepted:
            result.accepted, result.candidate_after, result.candidate_edit = False, result.after, result.edit
    elif result.gate is not None:
        result.gate = {**result.gate, "checks": list(result.gate.get("checks", [])) + ["verifier: verified"]}
    if not result.accepted and not keep_rejected and result.edit is result.candidate_edit:
        from .edit import Edit

        result.model = copy.deepcopy(model).cpu().eval()
        result.edit = Edit({}, {**result.candidate_edit.meta, "rejected": True,
                                "unchanged_because": "the candidate was rejected"})
        result.after = {**before, "verified": False, "verify_status": "not run on the input model"}
    return result

