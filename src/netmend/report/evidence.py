"""evidence.npz: the few inputs a report shows, with the model's decisions before and after the repair.

Written into a run folder at write time (`record.write_run`), from the defect object and the repaired model, so a
report can be rendered again later from the folder alone (`netmend report RUN`). Kept small (a dozen images at
most, a 64×64 grid per safety slice): a few kilobytes to a few tens of kilobytes.

What is in it depends on the defect (`meta["kind"]`):
  images    backdoor, spurious, leakage, adversarial, wrong predictions: the evidence pairs (corrupted, cleansed
            twin) and, where the defect's corruption can be stamped on other inputs (a trigger, a pattern), a few
            test images with and without it; uint8 pictures, true labels, decisions before / after
  fairness  per protected group of the test split: size, positive rate, accuracy, discrimination rate, before/after
  safety    2-D slices of the property's input box: the advisory on a grid before / after, where the property is
            violated, and the evidence counterexamples projected onto the slice
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..defects.capabilities import Counterfactual, PropertyRegion, Stamped, Targeted

MAX_PAIRS = 2          # evidence pairs shown (each: corrupted + clean)
MAX_STAMPED = 3        # test images shown clean and stamped
GRID = 64              # safety slice resolution
MAX_SIDE = 96          # pictures larger than this are shrunk for the report


# ----------------------------------------------------------------------------- models before / after

def _shifted(model: nn.Module, deltas: dict[str, torch.Tensor], sign: float) -> nn.Module:
    """A copy of `model` with `sign`·ΔW added (the Edit object is not touched: its exact backups stay its own)."""
    out = copy.deepcopy(model).cpu().eval()
    if not deltas:
        return out
    params = dict(out.named_parameters())
    params.update(dict(out.named_buffers()))
    with torch.no_grad():
        for k, d in deltas.items():
            if k in params:
                params[k].add_(sign * d.to(params[k].dtype))
    return out


def before_and_after(result) -> tuple[nn.Module, nn.Module, str]:
    """(the input model, the candidate the method produced, how to name the latter). A rejected candidate is
    rebuilt from the input model and its edit so the report can show what the gate turned down."""
    original = _shifted(result.model, result.edit.deltas, -1.0) if result.edit.deltas else result.model.cpu().eval()
    cand_edit = result.candidate_edit if result.candidate_edit is not None else result.edit
    if cand_edit is result.edit:                       # accepted, or a rejected candidate kept: the model carries it
        candidate = result.model.cpu().eval()
    else:
        candidate = _shifted(original, cand_edit.deltas, 1.0) if cand_edit.deltas else original
    return original, candidate, ("after" if result.accepted else "candidate (rejected)")


@torch.no_grad()
def _decide(model: nn.Module, x: torch.Tensor, argmin: bool = False) -> np.ndarray:
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = torch.cat([model(x[i: i + 4096].to(dev)).float().cpu() for i in range(0, len(x), 4096)])
    return (out.argmin(-1) if argmin else out.argmax(-1)).numpy().astype(np.int64)


# ----------------------------------------------------------------------------- per defect

def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """N×C×H×W (any range) -> N×H×W (gray) or N×H×W×3 uint8, one min/max for the whole strip so a pair keeps its
    contrast."""
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    side = max(x.shape[-2:])
    if side > MAX_SIDE:                  # large pictures: shrunk (area average) so the file stays small
        import torch.nn.functional as F

        x = F.interpolate(x, scale_factor=MAX_SIDE / side, mode="area")
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo if hi > lo else 1.0)
    if x.shape[1] == 3:
        x = x.permute(0, 2, 3, 1)
    else:
        x = x[:, 0]
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def _pairs(defect):
    try:
        p = defect.pairs
    except Exception:                  # noqa: BLE001 - a defect whose evidence is made at prepare() time
        return None
    return p if p is not None and len(p) else None


def _image_evidence(defect, before: nn.Module, after: nn.Module) -> dict[str, Any]:
    xs, labels, roles = [], [], []
    pairs = _pairs(defect)
    if pairs is not None:
        k = min(MAX_PAIRS, len(pairs))
        same = torch.equal(pairs.corrupted[:k], pairs.clean[:k])      # wrong predictions: the evidence is the input
        for i in range(k):
            xs.append(pairs.corrupted[i])
            labels.append(int(pairs.labels[i]))
            roles.append("evidence input" if same else "evidence: corrupted")
            if not same:
                xs.append(pairs.clean[i])
                labels.append(int(pairs.labels[i]))
                roles.append("evidence: cleansed twin")
    target = defect.target if isinstance(defect, Targeted) else None
    if target is None:
        target = getattr(defect, "cls", None)            # a spurious cue's class
    x_test, y_test = getattr(defect, "x_test", None), getattr(defect, "y_test", None)
    if isinstance(defect, Stamped) and defect.transplantable and x_test is not None and len(x_test):
        stamp = defect.stamp
        keep = (y_test != target).nonzero().flatten() if target is not None else torch.arange(len(y_test))
        pick = keep[:MAX_STAMPED]
        if len(pick):
            stamped = stamp(x_test[pick])
            for j, i in enumerate(pick.tolist()):
                xs += [x_test[i], stamped[j]]
                labels += [int(y_test[i]), int(y_test[i])]
                roles += ["test image", "test + stamp"]
    if not xs:
        return {}
    x = torch.stack([t.detach().cpu() for t in xs])
    classes = list(getattr(getattr(defect, "data", None), "classes", []) or [])
    meta = {"kind": "images", "roles": roles, "classes": [str(c) for c in classes],
            "target": None if target is None else int(target)}
    return {"meta": meta, "images": _to_uint8(x), "labels": np.array(labels, dtype=np.int64),
            "pred_before": _decide(before, x), "pred_after": _decide(after, x)}


@torch.no_grad()
def _fairness_evidence(defect, before: nn.Module, after: nn.Module) -> dict[str, Any]:
    from ..defects.fairness import discriminatory

    x, y, idx = defect.x_test, defect.y_test, defect.idx
    values, group = torch.unique(x[:, list(idx)], dim=0, return_inverse=True)
    names = list(defect.attributes)
    labels = [", ".join(f"{n}={int(v) if float(v).is_integer() else float(v):g}" for n, v in zip(names, row.tolist()))
              for row in values]
    out: dict[str, Any] = {"group_n": np.bincount(group.numpy(), minlength=len(values)).astype(np.int64)}
    for when, model in (("before", before), ("after", after)):
        pred = torch.from_numpy(_decide(model, x))
        disc = discriminatory(model, x, idx, defect.grid)
        pos, acc, dr = [], [], []
        for g in range(len(values)):
            m = group == g
            pos.append(float((pred[m] == 1).float().mean()) if m.any() else math.nan)
            acc.append(float((pred[m] == y[m]).float().mean()) if m.any() else math.nan)
            dr.append(float(disc[m].float().mean()) if m.any() else math.nan)
        out[f"positive_{when}"] = np.array(pos)
        out[f"accuracy_{when}"] = np.array(acc)
        out[f"discrimination_{when}"] = np.array(dr)
    classes = list(getattr(defect.data, "classes", ["0", "1"]))
    out["meta"] = {"kind": "fairness", "groups": labels, "protected": names,
                   "positive_class": str(classes[1]) if len(classes) > 1 else "1"}
    return out


@torch.no_grad()
def _safety_evidence(defect, before: nn.Module, after: nn.Module) -> dict[str, Any]:
    prop = defect.prop
    lo, hi = prop.boxes[0]
    lo, hi = lo.float(), hi.float()
    width = (hi - lo)
    order = torch.argsort(width, descending=True).tolist()
    dims = [d for d in order if width[d] > 0][:2]
    if len(dims) < 2:
        return {}
    cex = getattr(defect, "x_bad", torch.zeros(0, prop.n_inputs))
    anchor = cex[0].float() if len(cex) else (lo + hi) / 2          # the slice passes through a counterexample
    gx = torch.linspace(float(lo[dims[0]]), float(hi[dims[0]]), GRID)
    gy = torch.linspace(float(lo[dims[1]]), float(hi[dims[1]]), GRID)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    pts = anchor.repeat(GRID * GRID, 1)
    pts[:, dims[0]], pts[:, dims[1]] = xx.flatten(), yy.flatten()
    out: dict[str, Any] = {}
    for when, model in (("before", before), ("after", after)):
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        y = model(pts.to(dev)).float().cpu()
        out[f"advisory_{when}"] = y.argmin(-1).view(GRID, GRID).numpy().astype(np.int8)
        out[f"violated_{when}"] = prop.violated(y).view(GRID, GRID).numpy()
    c = cex[:200].float()
    out["counterexamples"] = c[:, dims].numpy() if len(c) else np.zeros((0, 2), dtype=np.float32)
    out["meta"] = {"kind": "safety", "dims": dims, "extent": [float(gx[0]), float(gx[-1]), float(gy[0]), float(gy[-1])],
                   "anchor": anchor.tolist(), "anchor_is": "a counterexample" if len(cex) else "the box centre",
                   "n_outputs": int(prop.n_outputs), "property": prop.name, "n_counterexamples": int(len(cex))}
    return out


def collect(defect, result) -> dict[str, Any]:
    """The evidence arrays for `result` (a RepairResult) of `defect`; {} when the defect has nothing to show."""
    before, after, after_label = before_and_after(result)
    kind = getattr(defect, "kind", "")
    if kind == "fairness" and isinstance(defect, Counterfactual):
        out = _fairness_evidence(defect, before, after)
    elif kind == "safety" and isinstance(defect, PropertyRegion):
        out = _safety_evidence(defect, before, after)
    elif len(getattr(defect, "in_shape", []) or []) == 3:
        out = _image_evidence(defect, before, after)
    else:
        out = {}
    if out:
        out["meta"]["after_label"] = after_label
        out["meta"]["defect"] = kind
    return out


def save(path: str | Path, ev: dict[str, Any]) -> None:
    arrays = {k: np.asarray(v) for k, v in ev.items() if k != "meta"}
    arrays["meta"] = np.array(json.dumps(ev.get("meta", {})))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load(path: str | Path) -> dict[str, Any]:
    """The arrays of an evidence.npz ({} when absent or unreadable); never unpickles."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            out: dict[str, Any] = {k: z[k] for k in z.files if k != "meta"}
            out["meta"] = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError):
        return {}
    return out
