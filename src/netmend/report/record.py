"""Run folders: everything needed to inspect, undo and rerun a repair.

model.safetensors + model.json (the repaired model; a run folder is itself a model folder),
edit.safetensors (the deltas), sites.json, metrics.json (before/after), config.json (resolved
config, seed, versions, data indices, the command line and the machine), evidence.npz (the few inputs the report
shows, with the decisions before and after) and report.html (rendered from the files beside it).
"""
from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from ..modelio import fresh_folder, save_model_folder, write_json
from .html import load_run, render_run

log = logging.getLogger("netmend")


def command_line(argv: list[str] | None = None) -> str:
    """The netmend command this process runs, as a user would type it again."""
    argv = list(sys.argv if argv is None else argv)
    return "netmend " + shlex.join(argv[1:])


def machine() -> dict[str, Any]:
    """Where the run ran: platform, CPU model, cores, torch threads (GPU name when CUDA is in use)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = {"platform": platform.platform(), "cpu": cpu, "cpu_cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _evidence(defect, result) -> dict[str, Any]:
    """The report's evidence arrays; a failure here never costs the user the run folder (the report says why)."""
    from .evidence import collect

    try:
        return collect(defect, result)
    except Exception as exc:          # noqa: BLE001 - the repair is done; the picture is a nicety
        log.warning("report: evidence not collected: %s", exc)
        return {"meta": {"kind": "error", "reason": f"{type(exc).__name__}: {exc}"}}


def repaired_info(info: dict[str, Any], result) -> dict[str, Any]:
    out = dict(info)
    out["metrics"] = {k: v for k, v in result.after.items() if not isinstance(v, (list, dict))}
    out["repair"] = {"method": result.method, "edit": "edit.safetensors", "parent_metrics": info.get("metrics", {}),
                     "accepted": result.accepted}
    if not result.accepted:
        out["repair"]["rejected_because"] = result.gate["reason"]
    described = result.config.get("defect", {})
    defect = dict(info.get("defect", {}))
    if isinstance(described.get("property"), dict) and described["property"].get("source"):
        # safety repairs: keep the property so `netmend evaluate RUN_DIR` needs no --property
        defect.update({"property": described["property"]["source"], "box": described.get("box", "official")})
    if described.get("kind"):
        defect["kind"] = described["kind"]
    out["defect"] = defect
    out["repairs"] = list(info.get("repairs", [])) + [result.method]
    if result.edit.layers is not None and "arch_args" in info:      # a structural edit: the widths it gave the chain
        out["arch_args"] = {**info["arch_args"], "hidden": _hidden(result.edit)}
    return out


def _hidden(edit) -> list[int]:
    """The hidden widths of a structural edit's chain."""
    return [int(w.shape[0]) for w, _ in edit.layers[:-1]]


def _structure(info: dict[str, Any], result) -> dict[str, Any]:
    """metrics.json's account of a structural edit (property-patch): no weight changed, parameters added."""
    out = {}
    for key, edit in (("structure", result.edit), ("candidate_structure", result.candidate_edit)):
        if edit is not None and edit.layers is not None and (key == "structure" or edit is not result.edit):
            out[key] = {"added_parameters": int(edit.meta.get("added_parameters", 0)),
                        "hidden_before": (info.get("arch_args") or {}).get("hidden"),
                        "hidden_after": _hidden(edit),
                        "original_weights_changed": 0}
    return out


def _report(folder: Path) -> str:
    try:
        return render_run(load_run(folder))
    except Exception as exc:          # noqa: BLE001 - never lose a finished repair to its report
        log.warning("report: could not render report.html: %s", exc)
        import html

        return (f"<!doctype html><meta charset=utf-8><title>netmend run</title><p>The report could not be rendered "
                f"({html.escape(type(exc).__name__)}: {html.escape(str(exc))}); run <code>netmend report "
                f"RUN_FOLDER --out report.html</code> to try again. The run's files are beside this one.</p>")


def write_run(out: str | Path, info: dict[str, Any], result, source: str | None = None, defect=None,
              command: str | None = None) -> Path:
    """Write the run folder for one RepairResult, whole or not at all (refuses a folder that holds anything).

    `defect` (the one repaired) lets the report show evidence inputs with the decisions before and after;
    `command` is recorded in config.json for the report's Reproduce section."""
    with fresh_folder(out) as tmp:
        if "model_form" in info:                  # the user's own model goes back in the form they brought
            from ..formats.user_model import write_user_model

            write_json(tmp / "model.json", repaired_info(write_user_model(info, result.model, tmp), result))
        else:
            save_model_folder(tmp, result.model, repaired_info(info, result))
        result.edit.save(tmp / "edit.safetensors")
        if result.candidate_edit is not None and result.candidate_edit is not result.edit:
            result.candidate_edit.save(tmp / "candidate-edit.safetensors")   # the rejected change, for inspection
        write_json(tmp / "sites.json", result.sites.to_json() if result.sites is not None
                   else {"localiser": None, "sites": []})
        write_json(tmp / "metrics.json", {"method": result.method, "before": result.before, "after": result.after,
                                          "seconds": result.seconds, "locate_seconds": result.locate_seconds,
                                          "repair_seconds": result.repair_seconds, "samples_used": result.samples_used,
                                          "edit_norms": result.edit.norms(result.model), "accepted": result.accepted,
                                          "gate": result.gate, "candidate_after": result.candidate_after,
                                          "note": result.summary().get("note"),
                                          **_structure(info, result)})
        write_json(tmp / "config.json", {**result.config, "source_model": source, "command": command,
                                         "machine": machine()})
        if defect is not None:
            from .evidence import save

            ev = _evidence(defect, result)
            if ev:
                save(tmp / "evidence.npz", ev)
        (tmp / "report.html").write_text(_report(tmp), encoding="utf-8")
    return Path(out)
