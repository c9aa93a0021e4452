"""`netmend bench`: a 2 × 2 × 2 digits grid gives the same table with 2 local workers, 1 worker and on Ray; a rerun
runs only the missing cells; bad grid files are one line and write nothing."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from netmend.bench import load_grid, run_bench
from netmend.errors import NetmendError

# 1 dataset × 1 arch × 2 attacks × 2 methods × 2 seeds: 4 models, 8 cells, a few seconds each on one thread
GRID = """
title = "digits test grid"
seeds = [0, 1]
datasets = ["digits"]
archs = ["mlp"]

[attacks.badnets]
size = 2

[attacks.blended]
alpha = 0.3

[train]
epochs = 4
pool_fraction = 0.3

[defect]
repair_fraction = 0.25
val_fraction = 0.5

[methods.finetune]
repair = { epochs = 1 }

[methods.rectify-static]
"""


def _quiet(*_):
    pass


def _write(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _tables(out: Path) -> tuple[str, str]:
    return (out / "results.csv").read_text(), (out / "results.md").read_text()


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("grid"), GRID)


@pytest.fixture(scope="module")
def two_workers(grid_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "w2"
    return out, run_bench(grid_file, out, workers=2, log=_quiet)


def test_two_workers_run_every_cell(two_workers):
    out, summary = two_workers
    assert len(summary["ran"]) == summary["cells"] == 8 and not summary["failed"]
    csv_text, md = _tables(out)
    lines = csv_text.splitlines()
    assert len(lines) == 9 and "seconds" not in lines[0]
    assert lines[0].startswith("cell,dataset,arch,attack,method,seed,status,accepted")
    assert md.count("\n| digits | mlp |") == 4 and " ± " in md          # 2 attacks × 2 methods, mean ± std of 2 seeds
    assert len(list((out / "models").iterdir())) == 4                  # each model trained once for its 2 methods
    assert (out / "report.html").is_file() and (out / "timings.csv").is_file()
    for cell in (out / "cells").iterdir():
        assert (cell / "run" / "metrics.json").is_file() and (cell / "cell.json").is_file()


def test_resume_runs_only_the_missing_cells(two_workers, grid_file, tmp_path):
    out, summary = two_workers
    assert summary["models_trained"] == 4
    before = _tables(out)
    # half the cells deleted from a finished output; a rerun stopped after 2 cells (--limit), then finished: exactly
    # the missing cells run, on one worker in this process, with the models already there, and the table comes
    # back byte for byte
    out2 = tmp_path / "copy"
    shutil.copytree(out, out2)
    gone = sorted(p.name for p in (out2 / "cells").iterdir())[::2]
    for name in gone:
        shutil.rmtree(out2 / "cells" / name)
    first = run_bench(grid_file, out2, workers=1, limit=2, log=_quiet)
    assert first["resumed"] and len(first["ran"]) == 2 and len(first["left"]) == 2 and first["models_trained"] == 0
    assert len(_tables(out2)[0].splitlines()) == 1 + 6
    second = run_bench(grid_file, out2, workers=1, log=_quiet)
    assert sorted(second["ran"]) == sorted(first["left"]) and sorted(first["ran"] + second["ran"]) == gone
    assert len(second["done_before"]) == 6 and _tables(out2) == before
    # a new output folder with the models from a shared cache: nothing is trained
    third = run_bench(grid_file, tmp_path / "cached", workers=1, cache=out / "models", limit=1, log=_quiet)
    assert len(third["ran"]) == 1 and third["models_trained"] == 0 and not (tmp_path / "cached" / "models").exists()
    # --only: a change that touches one method reruns only that method's cells; an unknown label is one line
    only = run_bench(grid_file, tmp_path / "cached", workers=1, cache=out / "models", only=["finetune"], log=_quiet)
    assert only["ran"] and all("finetune" in c for c in only["ran"]) and len(only["ran"]) + 1 + len(only["left"]) == 8
    assert all("rectify-static" in c for c in only["left"])
    with pytest.raises(NetmendError, match="--only nope: not a method"):
        run_bench(grid_file, tmp_path / "cached", workers=1, cache=out / "models", only=["nope"], log=_quiet)


def test_ray_gives_the_same_table(two_workers, grid_file, tmp_path):
    ray = pytest.importorskip("ray")
    out, _ = two_workers
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        s = run_bench(grid_file, tmp_path / "ray", ray="auto", cache=out / "models", log=_quiet)
    finally:
        ray.shutdown()
    assert s["backend"].startswith("Ray") and len(s["ran"]) == 8 and not s["failed"]
    assert _tables(tmp_path / "ray") == _tables(out)


def test_a_failed_cell_is_one_line_and_the_grid_goes_on(tmp_path):
    from typer.testing import CliRunner

    from netmend.cli import app

    grid = _write(tmp_path, GRID.replace('[attacks.blended]\nalpha = 0.3\n', '').replace("seeds = [0, 1]", "seeds = [0]")
                  .replace("[methods.rectify-static]\n", "") + '\n[methods.too-much]\nmethod = "finetune"\n'
                  'defect = { repair_fraction = 0.9 }\n')
    p = CliRunner().invoke(app, ["bench", str(grid), "--out", str(tmp_path / "o"), "--workers", "1", "--json"])
    assert p.exit_code == 1, p.output
    summary = json.loads(p.stdout)
    assert len(summary["ran"]) == 2 and list(summary["failed"]) == [c for c in summary["ran"] if "too-much" in c]
    error = next(iter(summary["failed"].values()))
    assert "repair fraction" in error and "\n" not in error
    csv_text, md = _tables(tmp_path / "o")
    assert csv_text.count(",ok,") == 1 and ",failed," in csv_text and "Failed cells" in md


BAD = {
    "toml syntax": ("seeds = [0\n", "not valid TOML"),
    "missing key": ('seeds = [0]\ndatasets = ["digits"]\narchs = ["mlp"]\n[attacks.badnets]\n', "methods: missing key"),
    "unknown method": (GRID.replace("[methods.rectify-static]", "[methods.nope]"), "methods.nope: unknown method 'nope'"),
    "unknown dataset": (GRID.replace('["digits"]', '["digitz"]'), "unknown dataset 'digitz'"),
    "wrong type": (GRID.replace("epochs = 4", 'epochs = "4"'), "train.epochs"),
    "unknown key": (GRID.replace("epochs = 4", "epoch = 4"), "train.epoch: unknown key"),
    "empty grid": (GRID.replace("seeds = [0, 1]", "seeds = []"), "seeds lists nothing"),
    "unknown option": (GRID.replace("repair = { epochs = 1 }", "repair = { epoks = 1 }"), "epoks"),
    "bad defect option": (GRID.replace("val_fraction = 0.5", "val_fractoin = 0.5"), "val_fractoin"),
    "unknown trigger": (GRID.replace("[attacks.blended]", "[attacks.glitter]"), "unknown trigger 'glitter'"),
    "bad device": (GRID.replace("seeds = [0, 1]", 'seeds = [0, 1]\ndevice = "gpu9"'), "not a torch device name"),
    "zero epochs": (GRID.replace("epochs = 4", "epochs = 0"), "option epochs=0: must be > 0"),
    "unknown augmentation": (GRID.replace("epochs = 4", 'epochs = 4\naugment = "mixup"'), "train.augment"),
    "models and datasets": (GRID.replace("seeds = [0, 1]", 'seeds = [0]\nmodels = ["m"]'), "not both"),
    "missing model folder": ('seeds = [0]\nmodels = ["nowhere"]\nmethods = ["finetune"]\n', "model folder not found"),
    "certify on a backdoor": (GRID.replace("repair = { epochs = 1 }", "repair = { epochs = 1 }\ncertify = true"),
                              "methods.finetune: certify proves safety properties"),
    "negative verify timeout": (GRID.replace("repair = { epochs = 1 }", "repair = { epochs = 1 }\nverify_timeout = -1.0"),
                                "verify_timeout > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_grid_files_are_one_line_and_write_nothing(case, tmp_path):
    text, fragment = BAD[case]
    grid = _write(tmp_path, text)
    with pytest.raises(NetmendError) as err:
        run_bench(grid, tmp_path / "out", workers=1, log=_quiet)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_bad_grid_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from netmend.cli import main

    grid = _write(tmp_path, "seeds = [0\n")
    monkeypatch.setattr(sys, "argv", ["netmend", "bench", str(grid), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "not valid TOML" in err
    assert not (tmp_path / "o").exists()


def test_another_grids_output_is_never_overwritten(two_workers, tmp_path):
    out, _ = two_workers
    other = _write(tmp_path, GRID.replace("seeds = [0, 1]", "seeds = [0]"))
    with pytest.raises(NetmendError, match="different grid"):
        run_bench(other, out, workers=1, log=_quiet)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(NetmendError, match="already holds files"):
        run_bench(other, tmp_path / "full", workers=1, log=_quiet)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_cells_and_model_keys_are_content_hashes(grid_file, tmp_path):
    a = load_grid(grid_file)
    b = load_grid(_write(tmp_path, "# a comment\n" + GRID.replace("[methods.finetune]\nrepair = { epochs = 1 }\n", "")
                         + "[methods.finetune]\nrepair = { epochs = 1 }\n"))
    assert a.hash == b.hash and {c.id for c in a.cells} == {c.id for c in b.cells}    # order and comments aside
    assert len(a.models) == 4 and len({c.id for c in a.cells}) == 8
    c = load_grid(_write(tmp_path, GRID.replace("epochs = 4", "epochs = 5"), "other.toml"))
    assert not set(c.models) & set(a.models) and c.hash != a.hash


def test_a_grid_of_existing_model_folders(two_workers, tmp_path):
    out, _ = two_workers
    folder = sorted((out / "models").iterdir())[0]
    grid = _write(tmp_path, f'seeds = [3]\nmodels = ["{folder}"]\n[defect]\nrepair_fraction = 0.25\n'
                            '[methods.finetune]\nrepair = { epochs = 1 }\n')
    s = run_bench(grid, tmp_path / "o", workers=1, log=_quiet)
    assert len(s["ran"]) == 1 and not s["failed"]
    header, row = (tmp_path / "o" / "results.csv").read_text().splitlines()
    assert header.startswith("cell,model,method,seed,status") and f",{folder},finetune,3,ok," in row
    assert not (tmp_path / "o" / "models").exists()                   # nothing trained


@pytest.mark.parametrize("grid", sorted((Path(__file__).parents[1] / "benchmarks" / "grids").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_grid_file_is_valid(grid):
    """The grids that reproduce the results tables parse, name known datasets / methods / options and expand."""
    assert len(load_grid(grid).cells) > 0


def test_model_folders_with_their_own_seeds(two_workers, tmp_path):
    """A models entry {folder, seeds} repairs that model with its own seeds only (a model trained with seed s,
    repaired with seed s); the grid needs no top-level seeds then, and the seeds are part of the grid's hash."""
    out, _ = two_workers
    a, b = sorted((out / "models").iterdir())[:2]
    text = (f'models = [{{ folder = "{a}", seeds = [0] }}, {{ folder = "{b}", seeds = [1, 2] }}]\n'
            '[defect]\nrepair_fraction = 0.25\n[methods.rectify-static]\n')
    plan = load_grid(_write(tmp_path, text))
    assert sorted((c.coords["model"], c.seed) for c in plan.cells) == [(str(a), 0), (str(b), 1), (str(b), 2)]
    other = load_grid(_write(tmp_path, text.replace("seeds = [1, 2]", "seeds = [1]"), "other.toml"))
    assert other.hash != plan.hash and len(other.cells) == 2
    mixed = load_grid(_write(tmp_path, f'seeds = [5]\nmodels = ["{a}", {{ folder = "{b}", seeds = [1] }}]\n'
                                       '[methods.rectify-static]\n', "mixed.toml"))
    assert sorted(c.seed for c in mixed.cells) == [1, 5]
    for bad, why in ((f'models = ["{a}"]\n[methods.rectify-static]\n', "seeds lists nothing"),
                     (f'models = [{{ folder = "{a}", seeds = [] }}]\n[methods.rectify-static]\n', "no seeds"),
                     (f'models = [{{ folder = "{a}", seeds = [1, 1] }}]\n[methods.rectify-static]\n', "twice")):
        with pytest.raises(NetmendError, match=why):
            load_grid(_write(tmp_path, bad, "bad.toml"))


SPURIOUS = """
seeds = [0]
datasets = ["digits"]
archs = ["mlp"]

[attacks.cue]
defect = "spurious"           # a 2×2 patch on half of class 1's training images, labels kept
kind = "badnets"
size = 2
cue_class = 1
fraction = 0.5

[train]
epochs = 4
pool_fraction = 0.3

[defect]
repair_fraction = 0.25

[methods.rectify-static]
"""


def test_a_grid_trains_a_spurious_cue_model(tmp_path):
    s = run_bench(_write(tmp_path, SPURIOUS), tmp_path / "o", workers=1, log=_quiet)
    assert len(s["ran"]) == 1 and not s["failed"]
    info = json.loads(next((tmp_path / "o" / "models").glob("*/model.json")).read_text())
    assert info["defect"]["kind"] == "spurious" and info["defect"]["class"] == 1 and info["defect"]["fraction"] == 0.5
    header, row = (tmp_path / "o" / "results.csv").read_text().splitlines()
    assert ",cue,rectify-static,0,ok," in row and "after_pattern_pull_rate" in header


def test_a_grid_trains_a_leakage_model(tmp_path, shared_data):
    grid = (f'seeds = [0]\ndatasets = ["mnist-5k"]\narchs = ["mlp"]\ndata_dir = "{shared_data}"\n'
            '[attacks.null-square]\ndefect = "leakage"\n[train]\nepochs = 1\n'
            '[defect]\nig_samples = 10\neval_limit = 200\n[methods.p-clarc]\ndefect = { pairs = 2 }\n')
    s = run_bench(_write(tmp_path, grid), tmp_path / "o", workers=1, log=_quiet)
    assert len(s["ran"]) == 1 and not s["failed"]
    info = json.loads(next((tmp_path / "o" / "models").glob("*/model.json")).read_text())
    assert info["dataset"] == "blockmnist" and info["defect"]["kind"] == "leakage" and info["defect"]["null"] == "square"
    assert "after_net_leakage" in (tmp_path / "o" / "results.csv").read_text()


def test_attack_fields_of_another_defect_are_refused(tmp_path):
    with pytest.raises(NetmendError, match="poison_rate is for a backdoor attack"):
        load_grid(_write(tmp_path, SPURIOUS.replace("fraction = 0.5", "fraction = 0.5\npoison_rate = 0.2"), "p.toml"))
    with pytest.raises(NetmendError, match="cue_class is for a spurious attack"):
        load_grid(_write(tmp_path, GRID.replace("[attacks.badnets]\n", "[attacks.badnets]\ncue_class = 1\n")))
    with pytest.raises(NetmendError, match="fraction must be in"):
        load_grid(_write(tmp_path, SPURIOUS.replace("fraction = 0.5", "fraction = 1.5"), "f.toml"))


ACAS = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (ACAS / "acasxu" / "nnet").is_dir(), reason="ACAS Xu files not found under ../shared/data")
def test_network_files_with_their_own_property_and_certified_cells(tmp_path):
    """`models` may name network files, each with the property it is repaired against; `certify = true` runs the
    repair → verify loop in the cell and the table gains `verified`. The same network under two properties is two
    entries (both violated: VNN-COMP's N2,9 φ2 and φ8); a defect option the defect does not know is one line naming
    the entry."""
    nnet = ACAS / "acasxu" / "nnet"
    text = f"""
seeds = [0]
data_dir = "{ACAS}"
models = [{{folder = "{nnet / 'ACASXU_run2a_1_4_batch_2000.nnet'}", defect = {{property = "prop_2"}}}},
          {{folder = "{nnet / 'ACASXU_run2a_2_9_batch_2000.nnet'}", defect = {{property = "prop_8"}}}},
          {{folder = "{nnet / 'ACASXU_run2a_2_9_batch_2000.nnet'}", defect = {{property = "prop_2"}}}}]
[defect]
eval_samples = 20000
fidelity_samples = 5000

[methods.property-patch]
certify = true
verify_timeout = 30
"""
    plan = load_grid(_write(tmp_path, text))
    assert len(plan.cells) == 3 and len(plan.models) == 2
    assert {c.coords["defect"] for c in plan.cells} == {"property=prop_2", "property=prop_8"}
    s = run_bench(_write(tmp_path, text), tmp_path / "o", workers=1, log=_quiet)
    assert not s["failed"], s["failed"]
    rows = (tmp_path / "o" / "results.csv").read_text().splitlines()
    head = rows[0].split(",")
    got = [dict(zip(head, r.split(","))) for r in rows[1:]]
    by = {(r["model"].rsplit("/", 1)[-1], r["defect"]): r for r in got}
    n14 = by["ACASXU_run2a_1_4_batch_2000.nnet", "property=prop_2"]
    assert n14["status"] == "ok" and n14["verified"] == "1" and float(n14["after_fidelity"]) == 1.0
    assert float(n14["after_violation_rate"]) == 0 < float(n14["before_violation_rate"])
    for prop in ("prop_8", "prop_2"):          # one network, two properties: two cells, each patched and proved
        r = by["ACASXU_run2a_2_9_batch_2000.nnet", f"property={prop}"]
        assert r["status"] == "ok" and r["verified"] == "1" and float(r["after_fidelity"]) == 1.0
    with pytest.raises(NetmendError, match="models .* defect"):
        load_grid(_write(tmp_path, text.replace('property = "prop_8"', 'property = "prop_8", nope = 1'), "bad.toml"))


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_grid_on_a_device_this_machine_lacks_is_one_line_and_writes_nothing(tmp_path):
    """Local workers run where the command runs: a grid naming a GPU this machine lacks stops before any training
    (a Ray cluster's workers have their own devices: not checked here)."""
    grid = _write(tmp_path, GRID.replace("seeds = [0, 1]", 'seeds = [0, 1]\ndevice = "cuda:7"'))
    with pytest.raises(NetmendError) as err:
        run_bench(grid, tmp_path / "out", workers=1, log=_quiet)
    assert "the grid's device cuda:7 is not available here; this machine has: cpu" in str(err.value)
    assert not (tmp_path / "out").exists()
