"""Reading a `netmend bench` output folder's cells: one reader for the runner's tables and for every script that
builds its own table from the cells, so none of them needs to know the folder layout.

    from netmend.bench import load_grid, read_cells
    for r in read_cells("out/digits", load_grid("grid.toml")):
        print(r.id, r.status, r.row.get("after_asr"), r.run)

A cell is finished when its folder holds cell.json (the runner writes the folder beside itself and renames it into
place, so a folder without cell.json is a killed run's leftover, never a result); a cell that failed has a record
under failed/ instead. The reader only reads: a grid that is still running can be read at any time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .grid import Cell, Plan

Status = Literal["ok", "failed", "not run"]


def cell_paths(out: Path, cid: str) -> tuple[Path, Path]:
    """(the cell's folder, its failure record) under an output folder: the layout the runner writes."""
    return out / "cells" / cid, out / "failed" / f"{cid}.json"


@dataclass(frozen=True)
class CellResult:
    """One cell of a grid output. `row` is the cell's row in results.csv (accepted, samples, weights changed and
    every metric before_ / after_); `run` its run folder (model, edit, metrics.json, config.json), None unless ok;
    `error` the one-line error of a failed cell."""
    id: str
    coords: dict[str, Any]                  # the table's key columns (dataset, arch, attack | model; method; seed)
    seed: int | None
    status: Status
    row: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None            # the whole cell (model load, repair, measurements)
    repair_seconds: float | None = None
    run: Path | None = None
    error: str | None = None

    @property
    def made(self) -> str:
        """The `row` prefix of what the method itself made: "candidate" where the gate rejected its change (the
        after_ numbers are then the input model's, handed back), else "after". Tables that report every method as
        the literature does read `row[f"{cell.made}_asr"]`."""
        rejected = any(k.startswith("candidate_") and v not in (None, "") for k, v in self.row.items())
        return "candidate" if rejected else "after"


def _finished(folder: Path, cell: Cell | None = None) -> CellResult:
    rec = json.loads((folder / "cell.json").read_text())
    cid, coords = (rec["cell"], rec["coords"]) if cell is None else (cell.id, cell.coords)
    return CellResult(id=cid, coords=coords, seed=coords.get("seed"), status="ok", row=rec["row"],
                      seconds=rec["seconds"], repair_seconds=rec["repair_seconds"], run=folder / "run")


def _failed(path: Path, cell: Cell | None = None) -> CellResult:
    rec = json.loads(path.read_text())
    cid, coords = (rec["cell"], rec["coords"]) if cell is None else (cell.id, cell.coords)
    return CellResult(id=cid, coords=coords, seed=coords.get("seed"), status="failed", error=rec["error"])


def read_cells(out: str | Path, plan: Plan | None = None) -> list[CellResult]:
    """The cells of the grid output `out`, whether its run finished, is still running or was stopped.

    With the grid's `plan` (`load_grid`): one result per planned cell, in the grid's order; a cell with neither a
    finished folder nor a failure record is "not run". Without: every cell the folder holds (the plan need not be
    at hand, e.g. outputs of several grid files read together), the finished ones sorted by id, then the failed ones
    sorted by id. A finished folder wins over a failure record (a rerun that succeeded)."""
    out = Path(out)
    if plan is not None:
        results = []
        for c in plan.cells:
            folder, fail = cell_paths(out, c.id)
            if (folder / "cell.json").is_file():
                results.append(_finished(folder, c))
            elif fail.is_file():
                results.append(_failed(fail, c))
            else:
                results.append(CellResult(id=c.id, coords=c.coords, seed=c.seed, status="not run"))
        return results
    folders = out / "cells"
    done = [_finished(f) for f in sorted(folders.iterdir(), key=lambda p: p.name)       # hidden: a partial folder
            if not f.name.startswith(".") and (f / "cell.json").is_file()] if folders.is_dir() else []
    ids = {r.id for r in done}
    records = sorted((out / "failed").glob("*.json"), key=lambda p: p.name) if (out / "failed").is_dir() else []
    failed = [_failed(p) for p in records if not p.name.startswith(".") and p.stem not in ids]
    return done + failed
