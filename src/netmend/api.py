"""The public entry points: repair(), locate(), evaluate(), load/save.

    import netmend
    model, info = netmend.load_model("runs/fmnist-badnets")
    defect = netmend.defect_for(info, pairs=1)
    result = netmend.repair(model, defect, method="rectify")
    print(result.before["asr"], result.after["asr"])
    result.edit.revert(result.model)       # back to the original, bit for bit
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .defects.base import Defect
from .defects.capabilities import check_needs
from .edit import Edit
from .errors import NetmendError
from .methods import MethodPreset
from .modelio import load_any_model
from .gate import DEFAULT_MAX_ACCURACY_DROP
from .gate import check as check_gate
from .progress import log, stage
from .registry import DEFECTS, LOCALISERS, METHODS, REPAIRERS, fill_defaults, make_config
from .sites import Sites



def load_model(path, weights=None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its info) from a model or run folder, a .nnet / .onnx / .pt2 file, or
    `package.module:factory` with `weights` (safetensors or a state dict)."""
    return load_any_model(path, weights)


@dataclass
class RepairResult:
    method: str
    model: nn.Module                 # a repaired copy; the input model is untouched
    edit: Edit
    sites: Sites | None
    before: dict[str, Any]
    after: dict[str, Any]
    seconds: float
    locate_seconds: float
    repair_seconds: float
    samples_used: int
    config: dict[str, Any] = field(default_factory=dict)
    accepted: bool = True            # passed the acceptance gate (netmend.gate); False: `model` is the input model
    gate: dict[str, Any] | None = None
    candidate_after: dict[str, Any] | None = None   # a rejected candidate's metrics (its edit: `candidate_edit`)
    candidate_edit: Edit | None = None
    certify: dict[str, Any] | None = None            # certified repair: rounds, repair / verify seconds

    def summary(self) -> dict[str, Any]:
        """The JSON object `netmend repair --json` prints (with a `note` when the repair changed no weight)."""
        out = {"method": self.method, "before": _scalars(self.before), "after": _scalars(self.after),
               "seconds": round(self.seconds, 3), "locate_seconds": round(self.locate_seconds, 3),
               "repair_seconds": round(self.repair_seconds, 3), "samples_used": self.samples_used,
               "edited_parameters": self.edit.parameters, "changed_weights": self.edit.num_changed()}
        out["accepted"] = self.accepted
        if self.certify is not None:
            out["certify"] = {k: self.certify[k] for k in ("repair_seconds", "verify_seconds")}
            out["certify"]["rounds"] = [{k: v for k, v in r.items() if k in ("round", "status", "added")}
                                        for r in self.certify["rounds"]]
        if self.gate is not None:
            out["gate"] = {"reason": self.gate["reason"], "checks": self.gate["checks"],
                           "max_accuracy_drop": self.gate["max_accuracy_drop"]}
        if self.candidate_after is not None:
            out["candidate_after"] = _scalars(self.candidate_after)
            kept = self.edit is self.candidate_edit
            out["note"] = f"repair rejected: {self.gate['reason']}" + (
                " (the candidate is kept, marked as rejected)" if kept else "; the model is returned unchanged")
            return out
        if out["changed_weights"] == 0:
            why = self.edit.meta.get("unchanged_because")
            out["note"] = "the repair changed no weight: the model is as it was" + (f" ({why})" if why else "")
        return out


def _scalars(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool)) or v is None}


def defect_for(info: dict[str, Any], data_dir=None, model: nn.Module | None = None, kind: str | None = None,
               **options) -> Defect:
    """Rebuild the defect a model folder records (its kind's options as keyword arguments), or with `kind` another
    one (`netmend repair --defect`: adversarial examples or wrong predictions on a clean model)."""
    kind = kind or info.get("defect", {}).get("kind")
    if kind in (None, "clean"):
        raise NetmendError("this model records no defect to repair (it was trained clean)")
    entry = DEFECTS.entry(kind)
    from .schema import check_defect_fields

    check_defect_fields(info, kind)
    info = {**info, "defect": {**info.get("defect", {}), "kind": kind}}
    extra = {"model": model} if (model is not None and entry.extra.get("needs_model")) else {}
    return entry.obj(info, make_config(entry.config, options), data_dir=data_dir, **extra)


def _config(entry, overrides: dict[str, Any], common: dict[str, Any], defect: Defect | None = None):
    """The component's typed config: its defaults, then the per-defect defaults it registered, then the options."""
    if entry.config is None:
        return make_config(None, overrides)
    names = {f.name for f in dataclasses.fields(entry.config)}
    merged = {k: v for k, v in common.items() if k in names and v is not None}
    merged.update(overrides)
    return fill_defaults(make_config(entry.config, merged), entry.extra.get("defaults"), defect)


def locate(model: nn.Module, defect: Defect, localiser: str, options: dict[str, Any] | None = None,
           seed: int = 0, device: str = "cpu") -> Sites:
    entry = LOCALISERS.entry(localiser)
    check_needs(defect, entry.extra.get("needs", ()), localiser)
    cfg = _config(entry, options or {}, {"seed": seed, "device": device}, defect)
    t0 = time.perf_counter()
    sites = entry.obj(model, defect, cfg)
    sites.seconds = sites.seconds or time.perf_counter() - t0
    return sites


def evaluate(model: nn.Module, defect: Defect) -> dict[str, Any]:
    return defect.metrics(model)


def repair(model: nn.Module, defect: Defect, method: str | None = None, localiser: str | None = None,
           repairer: str | None = None, locate_options: dict[str, Any] | None = None,
           repair_options: dict[str, Any] | None = None, seed: int = 0, device: str = "cpu",
           before: dict[str, Any] | None = None, max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
           gate: bool = True, keep_rejected: bool = False) -> RepairResult:
    """Localise, repair, check and measure. Works on a copy: the input model is never changed.

    The acceptance gate (netmend.gate) judges the candidate on repair data no method fits on: when the defect got
    worse or accuracy fell by more than `max_accuracy_drop`, the result is rejected (`accepted` False) and its model
    is the input model — unless `keep_rejected`, which returns the candidate marked as rejected."""
    if not (0 <= max_accuracy_drop <= 1) or max_accuracy_drop != max_accuracy_drop:
        raise NetmendError(f"max accuracy drop must be a share in [0, 1] (0.01 = one point), got {max_accuracy_drop}")
    if method is None and repairer is None:
        raise NetmendError("name a method, or a repairer (and optionally a localiser)")
    preset: MethodPreset = METHODS.get(method) if method else MethodPreset(localiser, repairer)
    loc_name = localiser if localiser is not None else preset.localiser
    rep_name = repairer or preset.repairer
    loc_opts = {**preset.locate_options, **(locate_options or {})}
    rep_opts = {**preset.repair_options, **(repair_options or {})}
    rep_entry = REPAIRERS.entry(rep_name)
    torch.manual_seed(seed)
    original = model.eval()
    with stage(f"measuring the {defect.kind} before the repair"):
        defect.prepare(original)
        for entry in ([LOCALISERS.entry(loc_name)] if loc_name else []) + [rep_entry]:   # its evidence is bound now
            check_needs(defect, entry.extra.get("needs", ()), method or entry.name)
        before = before if before is not None else defect.metrics(original)
    work = copy.deepcopy(original).to(device).eval()
    t0 = time.perf_counter()
    sites = None
    if loc_name:
        with stage(f"locating: {loc_name}"):
            sites = locate(work, defect, loc_name, loc_opts, seed, device)
    t1 = time.perf_counter()
    rep_cfg = _config(rep_entry, rep_opts, {"seed": seed, "device": device}, defect)
    with stage(f"repairing: {rep_name}"):
        edit = rep_entry.obj(work, defect, sites, rep_cfg)
    t2 = time.perf_counter()
    repaired = copy.deepcopy(original).cpu()
    edit.apply(repaired)
    repaired.eval()
    verdict = None
    if gate:
        with stage("acceptance gate: checking the candidate on held-apart repair data"):
            verdict = check_gate(defect, original, repaired, max_accuracy_drop)
    with stage("measuring after the repair"):
        after = defect.metrics(repaired)
    name = method or f"{loc_name or '-'}+{rep_name}"
    edit.meta.update({"method": name, "localiser": loc_name, "repairer": rep_name})
    config = {"method": name, "localiser": loc_name, "repairer": rep_name,
              "locate_options": dataclasses.asdict(_config(LOCALISERS.entry(loc_name), loc_opts, {"seed": seed, "device": device}, defect))
              if loc_name and LOCALISERS.entry(loc_name).config else loc_opts,
              "repair_options": dataclasses.asdict(rep_cfg) if rep_cfg is not None else {},
              "seed": seed, "device": device, "defect": defect.describe(), "versions": versions()}
    samples = int(edit.meta.get("samples_used", defect.samples_used(preset.uses_pairs)))
    result = RepairResult(name, repaired, edit, sites, before, after, t2 - t0, t1 - t0, t2 - t1, samples, config)
    if verdict is not None:
        result.gate = verdict.to_json()
        config["gate"] = {"max_accuracy_drop": max_accuracy_drop, "keep_rejected": keep_rejected}
        if not verdict.accepted:
            log.info("repair rejected: %s", verdict.reason)
            result.accepted, result.candidate_after, result.candidate_edit = False, after, edit
            if not keep_rejected:            # the output model is the input model
                result.model = copy.deepcopy(original).cpu().eval()
                result.edit = Edit({}, {**edit.meta, "rejected": True, "unchanged_because": "the gate rejected it"})
                result.after = before
    return result


def versions() -> dict[str, str]:
    from . import __version__

    import numpy

    return {"netmend": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}",
            "cpu_threads": str(torch.get_num_threads())}
