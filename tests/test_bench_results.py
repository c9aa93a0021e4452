"""`netmend.bench.read_cells`: the one reader of a grid output's cells (the runner's tables and the benchmark
scripts use it): finished cells with their row, seconds and run folder, failed ones with their one-line error,
planned ones not run yet; a half-written cell folder is never a result."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from netmend.bench import CellResult, load_grid, read_cells, run_bench

# 1 model (digits, mlp, badnets, seed 0) × 3 methods: one that runs, one that fails (its repair fraction asks for more
# samples than the pool holds), one left for later (--limit 2)
GRID = """
title = "read_cells test grid"
seeds = [0]
datasets = ["digits"]
archs = ["mlp"]

[attacks.badnets]
size = 2

[train]
epochs = 2
pool_fraction = 0.3

[defect]
repair_fraction = 0.25
val_fraction = 0.5

[methods.finetune]
repair = { epochs = 1 }

[methods.too-much]
method = "finetune"
defect = { repair_fraction = 0.9 }

[methods.later]
method = "finetune"
repair = { epochs = 1 }
"""


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    grid = folder / "grid.toml"
    grid.write_text(GRID)
    out = folder / "out"
    summary = run_bench(grid, out, workers=1, limit=2, log=_quiet)
    return load_grid(grid), out, summary


def test_with_the_plan_every_cell_in_grid_order(bench):
    plan, out, summary = bench
    res = read_cells(out, plan)
    assert [r.id for r in res] == [c.id for c in plan.cells]
    assert [r.status for r in res] == ["ok", "failed", "not run"]
    ok, failed, later = res
    assert all(isinstance(r, CellResult) for r in res)
    assert ok.coords == plan.cells[0].coords and ok.seed == 0 and ok.coords["method"] == "finetune"
    assert "accepted" in ok.row and "after_asr" in ok.row and "before_clean_accuracy" in ok.row
    assert ok.seconds > 0 and 0 < ok.repair_seconds <= ok.seconds and ok.error is None
    assert ok.run == out / "cells" / ok.id / "run" and (ok.run / "metrics.json").is_file()
    assert failed.error == summary["failed"][failed.id] and "repair fraction" in failed.error
    assert "\n" not in failed.error and failed.run is None and failed.row == {} and failed.seconds is None
    assert later.coords["method"] == "later" and later.error is None and later.run is None


def test_the_runner_tables_come_from_the_reader(bench):
    plan, out, _ = bench
    res = read_cells(out, plan)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv_lines[1:]] == [r.id for r in res if r.status != "not run"]
    timings = (out / "timings.csv").read_text().splitlines()
    assert timings[1] == f"{res[0].id},{res[0].seconds},{res[0].repair_seconds}"


def test_without_the_plan_what_the_folder_holds(bench):
    plan, out, _ = bench
    res = read_cells(out)
    assert [(r.id, r.status) for r in res] == [(plan.cells[0].id, "ok"), (plan.cells[1].id, "failed")]
    assert res == read_cells(out, plan)[:2]          # the records' coordinates are the plan's


def test_a_half_written_cell_folder_is_not_a_result(bench, tmp_path):
    plan, out, _ = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("models"))
    later = plan.cells[2].id
    (copy / "cells" / later / "run").mkdir(parents=True)                     # killed before its cell.json
    partial = copy / "cells" / f".{later}.partial-123-abc"                  # being renamed into place right now
    shutil.copytree(copy / "cells" / plan.cells[0].id, partial)
    assert [r.status for r in read_cells(copy, plan)] == ["ok", "failed", "not run"]
    assert [r.id for r in read_cells(copy)] == [c.id for c in plan.cells[:2]]


def test_a_finished_folder_wins_over_a_stale_failure_record(bench, tmp_path):
    plan, out, _ = bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("models"))
    ok = plan.cells[0]
    (copy / "failed" / f"{ok.id}.json").write_text(json.dumps({"cell": ok.id, "coords": ok.coords, "error": "old"}))
    assert read_cells(copy, plan)[0].status == "ok"
    assert [r.status for r in read_cells(copy)] == ["ok", "failed"]


def _cell(out: Path, cid: str, seed: int, seconds: float) -> None:
    folder = out / "cells" / cid
    (folder / "run").mkdir(parents=True)
    (folder / "cell.json").write_text(json.dumps({"cell": cid, "coords": {"model": "m", "method": "x", "seed": seed},
                                                  "row": {"accepted": True, "after_asr": 0.1}, "seconds": seconds,
                                                  "repair_seconds": seconds / 2}))


def test_a_hand_made_folder(tmp_path):
    assert read_cells(tmp_path / "nothing") == []
    out = tmp_path / "out"
    _cell(out, "m-x-s1-bbb", 1, 4.0)
    _cell(out, "m-x-s0-aaa", 0, 2.0)
    (out / "failed").mkdir()
    (out / "failed" / "m-y-s0-ccc.json").write_text(json.dumps(
        {"cell": "m-y-s0-ccc", "coords": {"model": "m", "method": "y", "seed": 0}, "error": "no pool"}))
    (out / "failed" / ".m-y-s0-ccc.json.x.tmp").write_text("{")             # a record being written
    res = read_cells(out)
    assert [(r.id, r.status, r.seed) for r in res] == [("m-x-s0-aaa", "ok", 0), ("m-x-s1-bbb", "ok", 1),
                                                       ("m-y-s0-ccc", "failed", 0)]
    assert res[0] == CellResult(id="m-x-s0-aaa", coords={"model": "m", "method": "x", "seed": 0}, seed=0, status="ok",
                                row={"accepted": True, "after_asr": 0.1}, seconds=2.0, repair_seconds=1.0,
                                run=out / "cells" / "m-x-s0-aaa" / "run")
    assert res[2].error == "no pool" and res[2].run is None


def test_made_names_the_numbers_of_what_the_method_returned():
    kept = CellResult(id="c", coords={}, seed=0, status="ok", row={"after_asr": 0.1, "candidate_asr": ""})
    rejected = CellResult(id="c", coords={}, seed=0, status="ok", row={"after_asr": 0.9, "candidate_asr": 0.1})
    assert kept.made == "after" and rejected.made == "candidate"
    assert rejected.row[f"{rejected.made}_asr"] == 0.1


def test_a_table_csv_reads_back_with_its_numbers(tmp_path):
    """`read_csv` (the benchmark scripts' --merge / --keep paths) gives back what the table writer wrote: ints and
    floats as numbers, text as text, an empty field as ""."""
    from netmend.bench.table import _csv, read_csv

    rows = [{"case": "n29-phi8", "seed": 0, "fidelity": 0.9894, "note": ""},
            {"case": "1e-3", "seed": 2, "fidelity": float("nan"), "note": "rejected: 1.2 points"}]
    path = tmp_path / "t.csv"
    path.write_text(_csv(rows))
    back = read_csv(path)
    assert back[0] == {"case": "n29-phi8", "seed": 0, "fidelity": 0.9894, "note": ""}
    assert isinstance(back[0]["seed"], int) and back[1]["case"] == 1e-3 and back[1]["note"] == "rejected: 1.2 points"
    assert back[1]["fidelity"] != back[1]["fidelity"]                 # NaN stays NaN
