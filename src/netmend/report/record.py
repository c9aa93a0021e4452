"""Run folders: everything needed to inspect, undo and rerun a repair.

model.safetensors + model.json (the repaired model; a run folder is itself a model folder),
edit.safetensors (the deltas), sites.json, metrics.json (before/after), config.json (resolved
config, seed, versions, data indices), report.html.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..modelio import fresh_folder, save_model_folder, write_json
from .html import render_report


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
    return out


def write_run(out: str | Path, info: dict[str, Any], result, source: str | None = None) -> Path:
    """Write the run folder for one RepairResult, whole or not at all (refuses a folder that holds anything)."""
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
                                          "gate": result.gate, "candidate_after": result.candidate_after})
        write_json(tmp / "config.json", {**result.config, "source_model": source})
        (tmp / "report.html").write_text(render_report(f"netmend repair: {result.method}", [result.summary()], info))
    return Path(out)
