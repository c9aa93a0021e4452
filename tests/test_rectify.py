"""rectify / rectify-static end to end on a tiny backdoored task (digits, seconds), plus presets and errors."""
from __future__ import annotations

import pytest
import torch

from netmend.api import defect_for, repair
from netmend.data.triggers import TriggerSpec
from netmend.errors import NetmendError
from netmend.registry import METHODS
from netmend.train import TrainConfig, train_backdoored


@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    model, info = train_backdoored("digits", "mlp", TriggerSpec(kind="badnets", size=2), target=0, poison_rate=0.1,
                                   cfg=TrainConfig(epochs=30, seed=0), pool_fraction=0.3)
    assert info["metrics"]["asr"] > 0.8
    return model, info


def test_presets_registered():
    assert METHODS.get("rectify").localiser == "attribution"
    assert METHODS.get("rectify-static").repairer == "rank-one"


def test_rectify_dynamic_reduces_asr_and_records_rounds(digits_model):
    model, info = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defect = defect_for(info, pairs=5, repair_fraction=0.25)
    res = repair(model, defect, method="rectify", locate_options={"n_steps": 16}, repair_options={"n_steps": 16})
    for k, v in model.state_dict().items():                      # the input model is untouched
        assert torch.equal(v, before[k])
    assert res.after["asr"] < 0.5 * res.before["asr"]
    assert res.after["clean_accuracy"] >= res.before["clean_accuracy"] - 0.05
    rounds = res.edit.meta["rounds"]
    assert rounds[0]["round"] == 0 and len(rounds) >= 2 and res.edit.meta["layers"]
    assert res.sites is not None and res.sites.details["scores"]
    res.edit.revert(res.model)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_rectify_static_edits_last_feature_layer(digits_model):
    model, info = digits_model
    defect = defect_for(info, pairs=5, repair_fraction=0.25)
    res = repair(model, defect, method="rectify-static")
    assert res.edit.parameters == ["fc2.weight"]                # image mlp: fc1, fc2 then the head `out`
    assert res.after["asr"] < res.before["asr"]


def test_rectify_needs_pairs(digits_model):
    model, info = digits_model
    defect = defect_for(info, pairs=0, repair_fraction=0.25)
    with pytest.raises(NetmendError, match="pairs"):
        repair(model, defect, method="rectify")


def test_rectify_probe_records_overshoot_and_pull_rate(digits_model):
    model, info = digits_model
    defect = defect_for(info, pairs=1, repair_fraction=0.25)
    res = repair(model, defect, method="rectify", repair_options={"n_steps": 16})
    r0, r1 = res.edit.meta["rounds"][:2]
    assert r0["probe"] > 0 and r0["gap"] == r0["probe_pull_rate"] > 0.5     # the stamp pulls before the repair
    assert r1["overshoot"] in (1.0, 1.25, 1.5, 2.0, 3.0) and r1["probe_pull_rate"] < r0["probe_pull_rate"]
    assert res.after["asr"] < 0.5 * res.before["asr"]


def test_rectify_without_probe_is_algorithm_1(digits_model):
    model, info = digits_model
    defect = defect_for(info, pairs=5, repair_fraction=0.25)
    res = repair(model, defect, method="rectify", repair_options={"n_steps": 16, "transplant": 0})
    r0 = res.edit.meta["rounds"][0]
    assert r0["probe"] == 0 and r0["gap"] == r0["pair_gap"]
    assert all(r.get("overshoot", 1.0) == 1.0 for r in res.edit.meta["rounds"][1:])


def test_probe_costs_price_over_correction():
    """Stamped samples of the pulled class (0) pushed out of it: "pull" cannot see it, "stamped" can."""
    from netmend.repair.rectify import PROBE_COSTS, _rates
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = y.clone()
    invariant = _rates(clean, torch.tensor([0, 0, 1, 1, 2, 2]), y, pulled=0)
    over = _rates(clean, torch.tensor([1, 2, 1, 1, 2, 2]), y, pulled=0)
    assert invariant["probe_pull_rate"] == over["probe_pull_rate"] == 0.0
    assert over["probe_kept_rate"] == 0.0 and invariant["probe_kept_rate"] == 1.0
    assert PROBE_COSTS["pull"](over) == PROBE_COSTS["pull"](invariant)
    assert PROBE_COSTS["stamped"](over) > PROBE_COSTS["stamped"](invariant)


def test_flip_cost_prices_a_cue_that_helps_its_own_class():
    """A clean sample of class 0 misread as 1, put right by the stamp: "stamped" rewards the bias, "flip" prices it."""
    from netmend.repair.rectify import PROBE_COSTS, _rates
    y = torch.tensor([0, 0, 1, 1])
    clean = torch.tensor([1, 0, 1, 1])
    biased = _rates(clean, torch.tensor([0, 0, 1, 1]), y, pulled=0)     # the cue fixes the class-0 sample
    invariant = _rates(clean, clean, y, pulled=0)                       # the cue changes nothing
    assert PROBE_COSTS["stamped"](biased) < PROBE_COSTS["stamped"](invariant)
    assert PROBE_COSTS["flip"](biased) == pytest.approx(PROBE_COSTS["flip"](invariant) + 0.25)


def test_rectify_probe_cost_follows_the_defect_and_can_be_chosen(digits_model):
    model, info = digits_model
    defect = defect_for(info, pairs=1, repair_fraction=0.25)
    assert defect.stamp_goal == "deny"
    res = repair(model, defect, method="rectify", repair_options={"n_steps": 16, "rounds": 1})
    assert res.edit.meta["probe_cost"] == "pull"
    res = repair(model, defect, method="rectify", repair_options={"n_steps": 16, "rounds": 1, "probe_cost": "stamped"})
    assert res.edit.meta["probe_cost"] == "stamped"
    with pytest.raises(NetmendError, match="probe_cost"):
        repair(model, defect, method="rectify", repair_options={"probe_cost": "nope"})


def test_pair_groups_are_fitted_one_after_another(digits_model):
    """A defect that splits its pairs into groups gets one dynamic run per group, each on the model the earlier
    ones left; the Edit is their sum, and each group is a view: the defect's pairs never change."""
    model, info = digits_model
    defect = defect_for(info, pairs=4, repair_fraction=0.25)
    everything = defect.pairs
    defect.pair_groups = lambda: [everything.subset(2), everything.select(torch.arange(4) >= 2)]
    opts = {"n_steps": 16, "transplant": 0}
    res = repair(model, defect, method="rectify", locate_options={"n_steps": 16}, repair_options=opts)
    assert defect.pairs is everything and len(res.edit.meta["groups"]) == 2
    assert res.edit.meta["layers"] == [l for g in res.edit.meta["groups"] for l in g["layers"]]
    first = _only(defect, everything.subset(2), lambda view: repair(model, view, method="rectify",
                                                                    locate_options={"n_steps": 16}, repair_options=opts))
    assert res.edit.meta["groups"][0]["layers"] == first.edit.meta["layers"]
    for k, d in first.edit.deltas.items():             # the second group adds to the first group's edit
        assert k in res.edit.deltas
    view = defect.with_pairs(everything.subset(1))     # a group is a view: the defect itself never changes
    assert len(view.pairs) == 1 and defect.pairs is everything and view.repair is defect.repair


def _only(defect, pairs, fn):
    del defect.pair_groups                             # back to the class's single group
    return fn(defect.with_pairs(pairs))


def test_recorded_probe_rates_are_those_of_the_edited_model(digits_model):
    """The loop reuses the rates `choose_overshoot` measured for the chosen γ instead of probing again: they
    must be the rates of the model the edit leaves (up to a near-tie flipped by rounding)."""
    from netmend.repair.rectify import RectifyConfig, make_probe, probe_rates

    model, info = digits_model
    defect = defect_for(info, pairs=1, repair_fraction=0.25)
    res = repair(model, defect, method="rectify", repair_options={"n_steps": 16, "rounds": 1})
    r1 = res.edit.meta["rounds"][1]
    assert res.edit.meta["layers"] == [r1["layer"]]
    probe = make_probe(model, defect, RectifyConfig())
    measured = probe_rates(res.model, probe)
    for k in ("probe_pull_rate", "probe_accuracy", "probe_flip_rate", "probe_stamped_accuracy"):
        assert measured[k] == pytest.approx(r1[k], abs=2 / len(probe.pairs)), k


def test_a_repair_data_estimate_drives_the_loop_without_a_probe(digits_model):
    """Without a transplant probe, a defect that estimates its metric on the repair data drives site choice,
    overshoot and stopping by it, and ε is judged on all repair samples; `estimate=False` is Algorithm 1 again."""
    from netmend.data.triggers import stamp_batched
    from netmend.metrics import predict
    from netmend.repair.rectify import repair_accuracy

    model, info = digits_model
    defect = defect_for(info, pairs=5, repair_fraction=0.25)
    r = defect.repair
    others = r.y_fit != defect.target
    stamped = stamp_batched(defect.trigger, r.x_fit[others])
    calls = []

    def asr_on_repair_data(m):                         # the backdoor's ASR, on repair samples only
        calls.append(1)
        return float((predict(m, stamped) == defect.target).float().mean())

    defect.repair_estimate = asr_on_repair_data
    opts = {"n_steps": 16, "transplant": 0}
    res = repair(model, defect, method="rectify", repair_options=opts)
    rounds = res.edit.meta["rounds"]
    assert res.edit.meta["driven_by"] == "estimate" and calls
    assert rounds[0]["gap"] == rounds[0]["estimate"] == pytest.approx(asr_on_repair_data(model))
    assert rounds[0]["val_accuracy"] == pytest.approx(repair_accuracy(model, defect))
    assert asr_on_repair_data(res.model) == pytest.approx(res.edit.meta["gap_after"])
    assert res.edit.meta["gap_after"] < 0.5 * rounds[0]["estimate"]
    for rec in rounds[1:]:
        for t in rec.get("tried", []):
            assert t["cost"] == t["estimate"] and t["overshoot"] in (1.0, 1.25, 1.5, 2.0, 3.0)
    plain = repair(model, defect, method="rectify", repair_options={**opts, "estimate": False})
    assert plain.edit.meta["driven_by"] == "pairs" and "estimate" not in plain.edit.meta["rounds"][0]


def test_one_probe_pass_for_many_edits_gives_each_edits_own_rates(digits_model):
    """probe_rates_many runs the shared prefix once and each edit's scales through the suffix only: every
    (edit, γ) must give the rates of the model with γ·ΔW applied, and the base rates those of the unedited model."""
    from netmend.edit import Edit
    from netmend.repair.rectify import RectifyConfig, make_probe, probe_rates, probe_rates_many

    model, info = digits_model
    defect = defect_for(info, pairs=1, repair_fraction=0.25)
    probe = make_probe(model, defect, RectifyConfig())
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    edits = [Edit({name: 0.5 * torch.randn(params[name].shape, generator=g)})
             for name in [n for n in params if n.endswith("weight")][:2]]
    gammas = [0.0, 1.0, 2.5]
    many, base = probe_rates_many(model, edits, gammas, probe, with_base=True)
    assert base == pytest.approx(probe_rates(model, probe))
    for edit, rates in zip(edits, many):
        for gamma, r in zip(gammas, rates):
            scaled = Edit({k: gamma * v for k, v in edit.deltas.items()})
            with scaled.applied(model):
                expect = probe_rates(model, probe)
            for k in ("probe_pull_rate", "probe_accuracy", "probe_flip_rate"):
                assert r[k] == pytest.approx(expect[k], abs=1 / len(probe.pairs)), (edit.parameters, gamma, k)


def test_defect_for_builds_the_kind_asked_for_and_names_a_bad_one(backdoored):
    """`api.defect_for(info, kind=...)` builds another defect than the model records (as `netmend repair --defect`);
    a kind that is not a defect, or a clean model with none named, is a one-line error."""
    import pytest

    from netmend.api import defect_for
    from netmend.errors import NetmendError

    model, info = backdoored
    assert defect_for(info, model=model, kind="wrong-predictions", seed=0).kind == "wrong-predictions"
    assert defect_for(info, model=model, seed=0).kind == "backdoor"
    with pytest.raises(NetmendError, match="adversarail"):
        defect_for(info, model=model, kind="adversarail")
    with pytest.raises(NetmendError, match="records no defect"):
        defect_for({**info, "defect": {"kind": "clean"}}, model=model)
