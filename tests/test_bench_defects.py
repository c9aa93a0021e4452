"""`netmend bench` beyond the defects training plants: a clean model (`defect = "clean"`) whose cells repair the defect
their `defect` options name (`kind = "adversarial"`, `"wrong-predictions"`), and a model trained with one class partly
mislabelled (`defect = "mislabelled"`); a bad option is one line naming it; the grids written before keep their
hash and cell ids."""
from __future__ import annotations

import json

import pytest

from netmend.bench import load_grid, read_cells, run_bench
from netmend.errors import NetmendError

from test_bench import GRID, SPURIOUS, _quiet, _write

# 1 clean digits MLP × 2 methods: FGSM/PGD adversarial examples, and wrong predictions; a few seconds in all
CLEAN = """
seeds = [0]
datasets = ["digits"]
archs = ["mlp"]

[attacks.clean]
defect = "clean"              # nothing planted: each method names the defect its cells repair

[train]
epochs = 4
pool_fraction = 0.3

[defect]
repair_fraction = 0.25
kind = "wrong-predictions"

[methods."finetune pgd"]
method = "finetune"
repair = { epochs = 1 }
defect = { kind = "adversarial", attack = "pgd", pairs = 20, eps = 0.1 }

[methods.finetune]
repair = { epochs = 1 }
"""

MISLABELLED = """
seeds = [0]
datasets = ["digits"]
archs = ["mlp"]

[attacks.ones]
defect = "mislabelled"        # 40 % of the 1s labelled 7
source_class = 1
as_class = 7
fraction = 0.4

[train]
epochs = 4
pool_fraction = 0.3

[defect]
repair_fraction = 0.25

[methods.finetune]
repair = { epochs = 1 }

[methods."finetune, the 1s only"]
method = "finetune"
repair = { epochs = 1 }
defect = { classes = "1" }
"""


def _config(res) -> dict:
    return json.loads((res.run / "config.json").read_text())


def test_a_clean_model_repaired_for_the_defect_its_cells_name(tmp_path):
    grid = _write(tmp_path, CLEAN)
    s = run_bench(grid, tmp_path / "o", workers=1, log=_quiet)
    assert len(s["ran"]) == 2 and not s["failed"], s["failed"]
    info = json.loads(next((tmp_path / "o" / "models").glob("*/model.json")).read_text())
    assert info["defect"] == {"kind": "clean"} and info["bench_recipe"]["defect"] == "clean"
    cells = {r.coords["method"]: r for r in read_cells(tmp_path / "o", load_grid(grid))}
    pgd = _config(cells["finetune pgd"])["defect"]
    assert pgd["kind"] == "adversarial" and pgd["attack"] == "pgd" and pgd["eps"] == 0.1     # the method's kind wins
    assert "before_robust_accuracy" in cells["finetune pgd"].row
    assert _config(cells["finetune"])["defect"]["kind"] == "wrong-predictions"              # the grid's [defect]
    assert "before_heldout_fixed" in cells["finetune"].row


def test_a_grid_trains_a_mislabelled_model(tmp_path):
    grid = _write(tmp_path, MISLABELLED)
    s = run_bench(grid, tmp_path / "o", workers=1, log=_quiet)
    assert len(s["ran"]) == 2 and not s["failed"], s["failed"]
    info = json.loads(next((tmp_path / "o" / "models").glob("*/model.json")).read_text())
    assert info["defect"]["kind"] == "wrong-predictions"                  # what a mislabelled model records
    assert {k: info["defect"]["mislabelled"][k] for k in ("class", "as", "fraction")} == {"class": 1, "as": 7,
                                                                                          "fraction": 0.4}
    cells = {r.coords["method"]: r for r in read_cells(tmp_path / "o", load_grid(grid))}
    assert _config(cells["finetune"])["defect"]["kind"] == "wrong-predictions"
    assert set(_config(cells["finetune, the 1s only"])["defect"]["evidence_classes"]) == {1}
    assert len(set(_config(cells["finetune"])["defect"]["evidence_classes"])) > 1
    assert all(r.coords["attack"] == "ones" for r in cells.values())


def test_a_clean_model_folder_with_the_kind_in_its_entry(tmp_path):
    """A `models` entry may be a clean model folder when its cells name a defect (here the entry's own `kind`); the
    folder alone is refused."""
    run_bench(_write(tmp_path, CLEAN.replace('[methods.finetune]\nrepair = { epochs = 1 }\n', '')), tmp_path / "o",
              workers=1, log=_quiet)
    folder = next((tmp_path / "o" / "models").iterdir())
    plan = load_grid(_write(tmp_path, f'seeds = [0]\nmodels = [{{ folder = "{folder}", defect = {{ kind = '
                                      f'"wrong-predictions" }} }}]\n[methods.finetune]\n', "m.toml"))
    assert [c.defect for c in plan.cells] == [{"kind": "wrong-predictions"}]
    assert plan.cells[0].coords["defect"] == "kind=wrong-predictions"
    with pytest.raises(NetmendError, match="records no defect to repair: name the one its cells repair"):
        load_grid(_write(tmp_path, f'seeds = [0]\nmodels = ["{folder}"]\n[methods.finetune]\n', "bare.toml"))


BAD = {
    "clean without a kind": (CLEAN.replace('kind = "wrong-predictions"\n', ''),
                             "attacks.clean records no defect to repair"),
    "unknown kind": (CLEAN.replace('kind = "adversarial"', 'kind = "adversarail"'),
                     "methods.finetune pgd.defect: unknown defect 'adversarail'"),
    "kind not a name": (CLEAN.replace('kind = "wrong-predictions"', 'kind = 3'), "defect: kind names a defect"),
    "option of another kind": (CLEAN.replace("eps = 0.1", 'classes = "1"'),
                               "methods.finetune pgd.defect: unknown option(s) ['classes'] for AdversarialOptions"),
    "misspelt option": (CLEAN.replace("eps = 0.1", "epz = 0.1"), "unknown option(s) ['epz']"),
    "kind the method does not repair": (CLEAN.replace('method = "finetune"\nrepair = { epochs = 1 }', 'method = "anp"'),
                                        "method 'anp' does not repair the defect 'adversarial'"),
    "mislabelled without as_class": (MISLABELLED.replace("as_class = 7\n", ""),
                                     "attacks.ones: a mislabelled attack needs source_class"),
    "mislabelled as itself": (MISLABELLED.replace("as_class = 7", "as_class = 1"),
                              "source_class and as_class must be two different classes"),
    "trigger field on a mislabelled attack": (MISLABELLED.replace("fraction = 0.4", "fraction = 0.4\nsize = 2"),
                                              "size is for a backdoor or spurious attack, this one plants a mislabelled"),
    "field on a clean attack": (CLEAN.replace('defect = "clean"', 'defect = "clean"\nfraction = 0.4'),
                                "fraction is for a spurious or mislabelled attack, this one plants nothing"),
    "mislabelled class on a backdoor": (GRID.replace("size = 2", "size = 2\nsource_class = 1"),
                                        "source_class is for a mislabelled attack"),
    "bad fraction": (MISLABELLED.replace("fraction = 0.4", "fraction = 1.5"), "fraction must be in (0, 1]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_one_line_naming_them(case, tmp_path):
    text, fragment = BAD[case]
    with pytest.raises(NetmendError) as err:
        run_bench(_write(tmp_path, text), tmp_path / "out", workers=1, log=_quiet)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_grids_written_before_keep_their_hash_and_cell_ids(tmp_path):
    """The fields added for clean and mislabelled models (and `kind`) stay out of the hashes of grids that do not use
    them: an earlier grid's output folder still resumes, with the same cell folders."""
    grid = load_grid(_write(tmp_path, GRID))
    assert grid.hash == "34be757f89394cee3420d09cc110146a8adca4049444a5b7732c6ed836e72d19"
    assert [c.id for c in grid.cells][:2] == ["digits-mlp-badnets-finetune-s0-c82c3b9c3c",
                                              "digits-mlp-badnets-finetune-s1-8ff003e829"]
    spurious = load_grid(_write(tmp_path, SPURIOUS, "s.toml"))
    assert spurious.hash == "7b0c617d767afe7cc877fdfd06ca301af017875e1bdc1969d3a6039d4cecd6c1"
    assert [c.id for c in spurious.cells] == ["digits-mlp-cue-rectify-static-s0-623f467ad8"]
