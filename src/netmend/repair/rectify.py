"""Yang et al.'s rectification (METHODS.md §3.4): dynamic — localise, edit, re-localise — and static.

Dynamic: each round ranks the candidate sites by editability (locate/attribution.py), applies one
rank-one edit at the best one (repair/rank_one.py), and re-measures. It stops when the pairs' gap
P(y|x) − P(y|x̃) falls below δ or after R rounds, and rolls back (then stops) an edit that costs more
than ε clean accuracy on the repair *validation* split. Static: one edit at the last feature layer.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import require
from ..locate.attribution import AttributionConfig, attribution_sites
from ..methods import MethodPreset
from ..registry import METHODS, REPAIRERS
from ..sites import Sites
from .rank_one import RankOneConfig, _pairs, rank_one_edit


@dataclass
class RectifyConfig:
    rounds: int = 10                  # R: most edits
    delta: float = 0.05               # δ: stop when mean P(y|x) − P(y|x̃) over the pairs is below this
    epsilon: float = 0.01             # ε: largest cumulative drop of validation accuracy (fraction) an edit may cost
    lookahead: int = 2                # edit the top-k ranked sites in turn and keep the one leaving the smallest gap
                                      # within ε (k = 1 is Algorithm 1 literally: the top site, stop on rollback)
    # localisation (each round); see AttributionConfig
    layers: list[str] | None = None
    variant: str = "A"
    output: str = "logit"
    n_steps: int = 32
    score: str = "editability"
    # the edit; see RankOneConfig
    pairs: int | None = None
    mode: str = "shared"
    mask_keys: bool = True
    protect_clean: bool = True
    mask_values: bool = False
    rho: float = 1e-4
    clamp: float = 1.0
    steps: int = 300
    lr: float = 1e-2
    stats_include_val: bool = False
    seed: int = 0
    device: str = "cpu"


def _sub(cfg, cls):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


@torch.no_grad()
def pair_gap(model: nn.Module, defect: Defect, n: int | None, device: str = "cpu") -> float:
    """δ* = mean over pairs of P(y|x) − P(y|x̃) (softmax probability of the true class)."""
    p = _pairs(defect, n)
    y = p.labels.to(device)[:, None]
    px = F.softmax(model(p.clean.to(device)), 1).gather(1, y)
    pb = F.softmax(model(p.corrupted.to(device)), 1).gather(1, y)
    return float((px - pb).mean())


@REPAIRERS.register("rectify", "dynamic rectification: re-localise by editability after every rank-one edit, "
                               "stop at gap < δ or R edits, roll back an edit costing > ε validation accuracy",
                    config=RectifyConfig)
def rectify_dynamic(model: nn.Module, defect: Defect, sites: Sites | None, cfg: RectifyConfig) -> Edit:
    require(cfg.rounds >= 1, f"rounds must be ≥ 1, got {cfg.rounds}")
    t0 = time.perf_counter()
    work = copy.deepcopy(model).eval()
    acfg, rcfg = _sub(cfg, AttributionConfig), _sub(cfg, RankOneConfig)
    acc0 = defect.validation_score(work)
    gap = pair_gap(work, defect, cfg.pairs, cfg.device)
    history = [{"round": 0, "gap": gap, "val_accuracy": acc0}]
    accepted: list[Edit] = []
    best_gap, best_n = gap, 0
    for r in range(1, cfg.rounds + 1):
        if gap <= cfg.delta:
            break
        ranked = sites if (r == 1 and sites is not None and sites.localiser == "attribution" and len(sites)) \
            else attribution_sites(work, defect, acfg)
        tried, choice = [], None
        for site in list(ranked)[: max(1, cfg.lookahead)]:
            edit = rank_one_edit(work, defect, site.layer, rcfg, value=site.info.get("value_point"))
            edit.apply(work)
            acc = defect.validation_score(work)
            new_gap = pair_gap(work, defect, cfg.pairs, cfg.device)
            edit.revert(work)
            rec = {"layer": site.layer, "score": site.score, "gap": new_gap, "val_accuracy": acc,
                   "accuracy_drop": acc0 - acc, "relative_norm": edit.meta.get("relative_norm"),
                   "clamped": edit.meta.get("clamped"), "within_budget": acc0 - acc <= cfg.epsilon}
            tried.append(rec)
            if rec["within_budget"] and (choice is None or new_gap < choice[1]["gap"]):
                choice = (edit, rec)
        entry = {"round": r, "ranking": [(s.layer, round(s.score, 6)) for s in ranked], "tried": tried}
        if choice is None:                 # every tried edit costs more than ε: roll back and stop
            entry["rolled_back"] = True
            history.append(entry)
            break
        edit, rec = choice
        edit.apply(work)
        entry.update(rec)
        history.append(entry)
        accepted.append(edit)
        if rec["gap"] >= gap:              # no progress on the pairs: further rounds would repeat this choice
            break
        gap = rec["gap"]
        if gap < best_gap:
            best_gap, best_n = gap, len(accepted)
    total = Edit({}, {})
    for e in accepted[:best_n]:
        total = total.merge(e)
    total.meta.update({"repairer": "rectify", "rounds": history, "layers": [e.meta["layer"] for e in accepted[:best_n]],
                       "gap_before": history[0]["gap"], "gap_after": best_gap, "val_accuracy_before": acc0,
                       "seconds": time.perf_counter() - t0})
    return total


METHODS.add("rectify", MethodPreset("attribution", "rectify", paper="Yang et al., CVPR 2026 (arXiv 2603.15656)"),
            "dynamic attribution-guided rectification: rank-one edits at the most editable layer, re-localised each round")
METHODS.add("rectify-static", MethodPreset(None, "rank-one", paper="Yang et al. (static ablation); Santurkar et al. 2021"),
            "one rank-one edit at the last feature layer with all given pairs")
