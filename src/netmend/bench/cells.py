"""What a worker does: train one model recipe, or repair and evaluate one cell.

Tasks take and return plain data (JSON-able dicts, file contents as bytes) and never touch the output folder: the
driver alone writes it, so a local pool and a Ray cluster without a shared file system behave the same, and a
killed worker leaves nothing half-written. Errors come back as one line, so one bad cell never stops the grid.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import NetmendError, first_line

Files = dict[str, bytes]


def one_thread() -> None:
    """One torch thread per worker: workers share the cores, and results must not depend on how kernels split sums."""
    import torch

    from ..memory import keep_freed_memory

    os.environ["NETMEND_QUIET"] = "1"
    torch.set_num_threads(1)
    keep_freed_memory()


def pack(folder: Path) -> Files:
    """A folder's files by relative path (small models: a run folder is a few hundred KB to a few MB); a network
    file (a grid's `models` may name one) as itself."""
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack(files: Files, folder: Path) -> Path:
    for rel, data in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def _error(exc: BaseException) -> str:
    return first_line(exc) if isinstance(exc, NetmendError) else f"{type(exc).__name__}: {first_line(exc)}"


def train_task(recipe: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """Train the model a recipe describes: {"files": model folder, "seconds": ...} or {"error": one line}."""
    try:
        one_thread()
        from ..data.triggers import TriggerSpec
        from ..modelio import save_model_folder
        from ..train import TrainConfig, train_backdoored

        t0 = time.perf_counter()
        cfg, kind = TrainConfig(**recipe["train"]), recipe.get("defect", "backdoor")
        common = {"device": recipe["device"], "data_dir": data_dir, "pool_fraction": recipe["pool_fraction"]}
        if kind == "spurious":
            from ..defects.spurious import train_spurious

            model, info = train_spurious(recipe["dataset"], recipe["arch"], TriggerSpec.from_json(recipe["trigger"]),
                                         recipe["cue_class"], recipe["fraction"], cfg, **common)
        elif kind == "leakage":
            from ..defects.leakage import train_leakage

            model, info = train_leakage(recipe["arch"], cfg, layout_seed=recipe["layout_seed"], null=recipe["null"],
                                        base=recipe["dataset"], **common)
        elif kind == "mislabelled":
            from ..defects.wrong_predictions import train_mislabelled

            model, info = train_mislabelled(recipe["dataset"], recipe["arch"], recipe["source_class"],
                                            recipe["as_class"], recipe["fraction"], cfg, **common)
        elif kind == "clean":                  # nothing planted: the model records no defect (kind "clean")
            model, info = train_backdoored(recipe["dataset"], recipe["arch"], None, cfg=cfg, **common)
        else:
            model, info = train_backdoored(recipe["dataset"], recipe["arch"], TriggerSpec.from_json(recipe["trigger"]),
                                           recipe["target"], recipe["poison_rate"], cfg, **common)
        info["data_dir"] = None                # each machine finds the data itself (--data-dir / $NETMEND_DATA)
        info["bench_recipe"] = recipe
        with tempfile.TemporaryDirectory(prefix="netmend-bench-") as tmp:
            save_model_folder(Path(tmp) / "model", model, info)
            return {"files": pack(Path(tmp) / "model"), "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - recorded against the model's cells, the grid goes on
        return {"error": _error(exc)}


def cell_task(cell: dict[str, Any], model: Files) -> dict[str, Any]:
    """Repair one model with one method and seed: {"files": run folder, "row": table row, "seconds": ...}."""
    try:
        one_thread()
        from .. import api
        from ..modelio import load_model_folder
        from ..report.record import write_run

        m = cell["method"]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="netmend-bench-") as tmp:
            folder = unpack(model, Path(tmp) / "model")
            if (folder / "model.json").is_file():
                net, info = load_model_folder(folder)
            else:                              # a network file (e.g. an ACAS Xu .nnet), loaded as the CLI would
                from ..modelio import load_any_model

                net, info = load_any_model(folder / next(iter(model)))
            # a `kind` among the options: another defect than the model records (as `netmend repair --defect`)
            defect = api.defect_for(info, data_dir=cell["data_dir"], model=net, **{**cell["defect"], "seed": cell["seed"]})
            how = dict(method=m["method"], localiser=m["localiser"], repairer=m["repairer"],
                       locate_options=m["locate"], repair_options=m["repair"], seed=cell["seed"],
                       device=cell["device"], max_accuracy_drop=m["max_accuracy_drop"] / 100, gate=m["gate"])
            if m.get("certify"):
                from ..certify import certified_repair

                result = certified_repair(net, defect, rounds=m["certify"]["rounds"],
                                          verify_timeout=m["certify"]["verify_timeout"], **how)
            else:
                result = api.repair(net, defect, **how)
            row = result_row(result)
            result.method = cell["id"]         # the comparison report names each run by its cell
            write_run(Path(tmp) / "run", info, result, source=cell["model_source"], defect=defect,
                      command=f"netmend bench GRID --out OUT   # cell {cell['id']}")
            return {"files": pack(Path(tmp) / "run"), "row": row,
                    "seconds": time.perf_counter() - t0, "repair_seconds": result.seconds}
    except Exception as exc:  # noqa: BLE001 - one failed cell is one line in the table
        return {"error": _error(exc)}


def result_row(result) -> dict[str, Any]:
    """The cell's numbers for the table: everything deterministic, nothing measured in seconds."""
    s = result.summary()
    row: dict[str, Any] = {"accepted": s["accepted"], "samples_used": s["samples_used"],
                           "changed_weights": s["changed_weights"]}
    # rejected: after = before, and the rejected candidate's own numbers are kept beside them (candidate_*)
    for when, metrics in (("before", s["before"]), ("after", s["after"]), ("candidate", s.get("candidate_after") or {})):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "seconds" not in k:
                row[f"{when}_{k}"] = v
    if "verified" in s["after"]:           # a certified cell: did the verifier prove the result (1) or not (0)
        row["verified"] = int(bool(s["after"]["verified"]))
    return row
