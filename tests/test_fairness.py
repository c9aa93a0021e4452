"""Fairness defect and tabular data: discrimination metric on hand-made biased models, loaders, bad input."""
from __future__ import annotations

import torch
import pytest
from torch import nn

from netmend.data.datasets import resolve_data_dir
from netmend.data.tabular import CENSUS, TabularData, load_discretised, load_tabular, split_tabular
from netmend.defects.fairness import (FairnessDefect, FairnessOptions, demographic_parity_difference, discriminatory,
                                      equalized_odds_difference, group_ids, protected_grid,
                                      train_fairness)
from netmend.errors import NetmendError
from netmend.registry import DATASETS, DEFECTS

DATA = resolve_data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "fairness").is_dir(),
                                reason="needs ../shared/data/fairness (the UCI and discretised CSV files)")


def synthetic(n: int = 400, seed: int = 0) -> TabularData:
    """Features a ∈ 0..2 (protected 'group'), b ∈ 0..3, c ∈ 0..1 (protected 'flag'); y = 1[b ≥ 2]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g),
                     torch.randint(0, 2, (n,), generator=g)], 1).float()
    return TabularData("synthetic", x, (x[:, 1] >= 2).long(), ["a", "b", "c"], [0, 0, 0], [2, 3, 1], {"group": 0, "flag": 2})


class Rule(nn.Module):
    """A parameter-free classifier from a boolean rule on the features; counts its forward calls."""

    def __init__(self, rule):
        super().__init__()
        self.rule, self.calls = rule, 0

    def forward(self, x):
        self.calls += 1
        p1 = self.rule(x).float()
        return torch.stack([1 - p1, p1], -1) * 4.0 - 2.0


READS_PROTECTED = Rule(lambda x: x[:, 0] >= 1)                    # label = f(a) only
IGNORES_PROTECTED = Rule(lambda x: x[:, 1] >= 2)                  # label = f(b) only
BIASED_WHEN_B0 = Rule(lambda x: (x[:, 0] == 2) & (x[:, 1] == 0) | (x[:, 1] >= 2))   # a matters iff b == 0


def test_discrimination_rate_of_hand_made_models_in_one_forward_pass():
    d = synthetic()
    grid = protected_grid(d.lo, d.hi, [0])
    assert grid.squeeze(1).tolist() == [0.0, 1.0, 2.0]
    model = Rule(lambda x: x[:, 0] >= 1)
    assert discriminatory(model, d.x, [0], grid).all()
    assert model.calls == 1                                         # batched: one pass over N × M rows
    assert not discriminatory(IGNORES_PROTECTED, d.x, [0], grid).any()
    rate = discriminatory(BIASED_WHEN_B0, d.x, [0], grid).float().mean()
    assert rate == pytest.approx(float((d.x[:, 1] == 0).float().mean()))


def test_several_protected_attributes_use_the_cartesian_product():
    d = synthetic()
    grid = protected_grid(d.lo, d.hi, [0, 2])
    assert grid.shape == (6, 2) and len({tuple(r) for r in grid.tolist()}) == 6
    only_flag = Rule(lambda x: x[:, 2] == 1)
    assert discriminatory(only_flag, d.x, [0, 2], grid).all()       # c flips through the product
    assert not discriminatory(only_flag, d.x, [0], protected_grid(d.lo, d.hi, [0])).any()


def test_group_metrics_by_hand():
    pred = torch.tensor([1, 1, 0, 0, 1, 0])
    y = torch.tensor([1, 0, 1, 0, 1, 1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert demographic_parity_difference(pred, groups) == pytest.approx(2 / 3 - 1 / 3)
    # TPR: g0 1/2, g1 1/2 -> 0; FPR: g0 1/1, g1 0/1 -> 1
    assert equalized_odds_difference(pred, y, groups) == pytest.approx(1.0)
    assert group_ids(torch.tensor([[0., 1.], [0., 2.], [0., 1.]]), [1]).tolist() == [0, 1, 0]


def test_defect_metrics_evidence_and_objective_on_a_synthetic_table():
    data = synthetic(600)
    splits = split_tabular(len(data.y), 0)
    assert sorted(splits["train"] + splits["repair_pool"] + splits["test"]) == list(range(600))
    defect = FairnessDefect(data, splits, "group", FairnessOptions(pairs=10, uniform_samples=500, objective="care"))
    m = defect.metrics(BIASED_WHEN_B0)
    assert 0 < m["discrimination_rate"] < 1 and 0 < m["discrimination_rate_uniform"] < 1
    for k in ("clean_accuracy", "demographic_parity_difference", "equalized_odds_difference"):
        assert 0 <= m[k] <= 1
    assert defect.metrics(IGNORES_PROTECTED)["discrimination_rate"] == 0.0
    assert defect.metrics(READS_PROTECTED)["discrimination_rate_uniform"] == 1.0

    obj = defect.objective(BIASED_WHEN_B0)                          # binds the evidence to this model
    e = len(defect.pairs)
    assert e == 10 and (defect.pairs.corrupted[:, 1] == 0).all()    # every instance is truly discriminatory
    assert defect.metrics(BIASED_WHEN_B0)["discrimination_rate_evidence"] == 1.0
    assert obj.x_bad.shape == (e + e * 3, 3)
    logits = BIASED_WHEN_B0(obj.x_bad)
    assert obj.violated(logits).all()
    stacked = torch.stack([logits, IGNORES_PROTECTED(obj.x_bad)])    # (P, N_bad, K), e.g. PSO particles
    v = obj.violated(stacked)
    assert v.shape == (2, e) and v[0].all() and not v[1].any()
    assert torch.equal(obj.y_good, data.y[defect.repair.indices["fit"]])
    cost = obj.cost(stacked, torch.stack([BIASED_WHEN_B0(obj.x_good)] * 2), alpha=0.3)
    assert cost[0] > cost[1]


def test_pool_objective_counts_pool_rows_and_validation_is_apart():
    data = synthetic(600)
    defect = FairnessDefect(data, split_tabular(len(data.y), 0), "group", FairnessOptions(pairs=10, uniform_samples=50))
    obj = defect.objective(BIASED_WHEN_B0)
    val = set(defect.repair.indices["val"])
    rows = [i for i in defect._pool if i not in val]
    own = [j for j, i in enumerate(defect.pairs.indices) if i not in val]
    assert len(obj.violated(BIASED_WHEN_B0(obj.x_bad))) == len(own) + len(rows)
    vobj = defect.validation_objective(BIASED_WHEN_B0)
    assert len(vobj.violated(BIASED_WHEN_B0(vobj.x_bad))) == len(defect.repair.y_val)
    assert torch.equal(vobj.y_good, defect.repair.y_val)
    assert not IGNORES_PROTECTED(vobj.x_bad).isnan().any() and not vobj.violated(IGNORES_PROTECTED(vobj.x_bad)).any()


def test_violation_is_differentiable_and_zero_without_bias():
    data = synthetic()
    defect = FairnessDefect(data, split_tabular(len(data.y), 0), "group", FairnessOptions(uniform_samples=10))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    v = defect.violation(net, data.x[:7])
    assert v.shape == (7,) and (v >= 0).all()
    v.sum().backward()
    assert net[0].weight.grad is not None
    with torch.no_grad():
        net[0].weight[:, 0] = 0                                      # the protected input is ignored
    assert defect.violation(net, data.x[:7]).abs().max() < 1e-6


def test_evidence_search_generates_instances_when_the_pool_has_few():
    data = synthetic(400)
    g = torch.Generator().manual_seed(1)
    data.x[:, 1] = torch.randint(0, 100, (400,), generator=g).float()   # a wide non-protected domain
    data.x[data.x[:, 1] == 37, 1] = 36                                  # the biased value is absent from the table
    data.hi[1] = 99
    rare = Rule(lambda x: (x[:, 0] == 2) & (x[:, 1] == 37) | (x[:, 1] >= 50))   # a matters only at b == 37
    defect = FairnessDefect(data, split_tabular(400, 0), "group", FairnessOptions(pairs=5, uniform_samples=10, seed=3))
    defect.bind(rare)
    info = defect.evidence_info
    assert info["from_pool"] == 0 and info["generated"] == len(defect.pairs) == 5
    assert discriminatory(rare, defect.pairs.corrupted, [0], defect.grid).all()
    assert not torch.equal(rare(defect.pairs.corrupted).argmax(1), rare(defect.pairs.clean).argmax(1))
    with pytest.raises(NetmendError, match="no discriminatory"):
        FairnessDefect(data, split_tabular(400, 0), "group", FairnessOptions(uniform_samples=10)).bind(IGNORES_PROTECTED)


def test_trainer_info_and_registry_round_trip(tmp_path):
    from netmend.modelio import load_model_folder, save_model_folder

    data = synthetic(500)
    model, info = train_fairness("synthetic", "mlp", seed=1, epochs=2, protected="group,flag", data=data)
    assert info["defect"] == {"kind": "fairness", "protected": ["group", "flag"], "protected_indices": [0, 2]}
    assert info["arch_args"]["hidden"] == [64, 32, 16, 8, 4] and info["arch_args"]["in_shape"] == [3]
    assert 0 <= info["metrics"]["discrimination_rate"] <= 1
    save_model_folder(tmp_path / "m", model, info)
    loaded, info2 = load_model_folder(tmp_path / "m")
    defect = DEFECTS.get("fairness")(info2, FairnessOptions(uniform_samples=100), data=data)
    assert len(defect.grid) == 6
    assert defect.metrics(loaded)["clean_accuracy"] == pytest.approx(info["metrics"]["clean_accuracy"])


def test_bad_input_gives_one_line_errors(tmp_path):
    data = synthetic()
    with pytest.raises(NetmendError, match="unknown protected attribute 'gender'.*valid: group, flag") as e:
        data.protected_indices("gender")
    assert "\n" not in str(e.value)
    with pytest.raises(NetmendError, match="unknown protected"):
        FairnessDefect(data, split_tabular(len(data.y), 0), "group,colour")
    bad = tmp_path / "census.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(NetmendError, match="expected 14 columns"):
        load_discretised("census", CENSUS, "census.csv", path=bad)
    bad.write_text(",".join("abcdefghijklmn") + "\n" + ",".join(["1"] * 13 + ["yes"]) + "\n")
    with pytest.raises(NetmendError, match="not an integer-coded table"):
        load_discretised("census", CENSUS, "census.csv", path=bad)
    bad.write_text(",".join("abcdefghijklmn") + "\n" + ",".join(["9"] * 13 + ["0"]) + "\n")
    with pytest.raises(NetmendError, match="outside its domain"):
        load_discretised("census", CENSUS, "census.csv", path=bad)
    with pytest.raises(NetmendError, match="unknown tabular dataset"):
        load_tabular("nope")


def test_tabular_datasets_are_registered_with_the_trainer():
    for name in ("census", "credit", "bank", "adult", "german", "bank-raw"):
        e = DATASETS.entry(name)
        assert e.extra["kind"] == "tabular" and e.extra["trainer"] is train_fairness


@needs_data
def test_discretised_loaders_shapes_domains_and_protected():
    expect = {"census": ((48842, 13), {"sex": 8, "race": 7, "age": 0}),
              "credit": ((1000, 24), {"sex": 6, "age": 9}),
              "bank": ((45211, 16), {"age": 0})}
    for name, (shape, prot) in expect.items():
        d = load_tabular(name)
        assert tuple(d.x.shape) == shape and len(d.y) == shape[0] and set(d.y.tolist()) == {0, 1}
        assert d.protected == prot and len(d.features) == shape[1]
        lo, hi = torch.tensor(d.lo).float(), torch.tensor(d.hi).float()
        assert (d.x >= lo).all() and (d.x <= hi).all() and torch.equal(d.x, d.x.round())
    census = load_tabular("census")
    assert (census.lo[8], census.hi[8]) == (0, 1) and (census.lo[7], census.hi[7]) == (0, 4)


@needs_data
def test_raw_uci_loaders_reproduce_the_discretised_encoding():
    adult, census = load_tabular("adult"), load_tabular("census")
    assert torch.equal(adult.x, census.x) and torch.equal(adult.y, census.y)
    raw, bank = load_tabular("bank-raw"), load_tabular("bank")
    assert torch.equal(raw.x, bank.x) and torch.equal(raw.y, bank.y)
    german = load_tabular("german")
    assert tuple(german.x.shape) == (1000, 20) and german.protected == {"sex": 8, "age": 12}
    assert (german.lo[8], german.hi[8]) == (0, 1) and float(german.y.float().mean()) == pytest.approx(0.7)


@needs_data
def test_credit_model_trains_and_reports_discrimination():
    model, info = train_fairness("credit", "mlp", seed=0, epochs=10, protected="sex,age")
    m = info["metrics"]
    assert info["n_test"] == 200 and 0.5 < m["clean_accuracy"] <= 1
    assert 0 <= m["discrimination_rate"] <= 1 and m["n_uniform"] == 10000


@pytest.mark.slow
@needs_data
def test_census_sex_model_is_accurate_and_somewhat_discriminatory():
    model, info = train_fairness("census", "mlp", seed=0, protected="sex")
    m = info["metrics"]
    assert m["clean_accuracy"] > 0.8 and 0 < m["discrimination_rate"] < 0.5
