"""Spurious-correlation defect (labels never change, metrics on a hand-made biased model) and ClArC."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import netmend
from netmend.data.datasets import ImageData, split_indices
from netmend.data.triggers import TriggerSpec, build_trigger
from netmend.defects.spurious import (MovedPattern, SpuriousDefect, SpuriousOptions, spurious_from_info, stamp_class,
                                      train_spurious)
from netmend.errors import NetmendError
from netmend.train import TrainConfig

C = 2                                  # the spurious class of the synthetic set
PATCH = TriggerSpec(kind="badnets", size=3, position="br")


def synthetic(n_train: int = 400, n_test: int = 80) -> ImageData:
    """4 classes on 8×8 images: class k lights pixel (0, k). Half of class C's test images are
    'hard': they light pixel (0, C+1) instead, so an honest reader gets them wrong."""
    def make(n):
        y = torch.arange(n) % 4
        x = torch.zeros(n, 1, 8, 8)
        x[torch.arange(n), 0, 0, y] = 1.0
        return x, y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    hard = torch.nonzero(yte == C).flatten()[::2]
    xte[hard, 0, 0, C] = 0.0
    xte[hard, 0, 0, C + 1] = 1.0
    return ImageData("synthetic", xtr, ytr, xte, yte, [str(i) for i in range(4)])


class Reader(nn.Module):
    """Logits = the four class pixels, plus `bias` × (patch brightness) on class C."""

    def __init__(self, bias: float):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, x):
        z = x[:, 0, 0, :4].clone()
        patch = x[:, 0, 5:, 5:].mean((1, 2))
        z[:, C] = z[:, C] + self.bias * patch
        return z


def make_defect(data: ImageData, pairs: int = 4, **kw) -> SpuriousDefect:
    splits = split_indices(len(data.y_train), 0, 0.5)
    return SpuriousDefect(data, splits, build_trigger(PATCH, data.in_shape), C,
                          SpuriousOptions(pairs=pairs, repair_fraction=0.1, **kw))


def test_stamping_never_changes_labels_and_only_touches_the_class():
    data = synthetic()
    trig = build_trigger(PATCH, data.in_shape)
    x, chosen = stamp_class(data.x_train, data.y_train, trig, C, 0.5, seed=1)
    assert len(chosen) == 50 and all(int(data.y_train[i]) == C for i in chosen)
    changed = torch.nonzero((x != data.x_train).flatten(1).any(1)).flatten().tolist()
    assert changed == chosen
    assert torch.equal(x[chosen], trig.apply(data.x_train[chosen]))
    assert stamp_class(data.x_train, data.y_train, trig, C, 0.5, seed=1)[1] == chosen
    with pytest.raises(NetmendError):
        stamp_class(data.x_train, data.y_train, trig, C, 1.5, seed=1)


def test_metrics_on_a_hand_made_biased_model():
    d = make_defect(synthetic())
    biased = d.metrics(Reader(bias=10.0))
    assert biased["clean"] == pytest.approx(0.5)              # the hard half of class C is misread
    assert biased["with_pattern"] == pytest.approx(1.0)       # the pattern rescues all of them
    assert biased["spur"] == pytest.approx(0.5)
    assert biased["pattern_pull_rate"] == pytest.approx(1.0)  # and pulls every other class into C
    assert biased["overall_accuracy"] == biased["clean_accuracy"] == pytest.approx(70 / 80)
    honest = d.metrics(Reader(bias=0.0))
    assert honest["spur"] == 0.0 and honest["pattern_pull_rate"] == 0.0 and honest["clean"] == pytest.approx(0.5)
    v = d.violation(Reader(bias=10.0), d.pairs.corrupted, d.pairs.labels)
    assert v.shape == (4,) and (v > 0.9).all()


def test_pairs_are_other_class_images_with_and_without_the_pattern():
    data = synthetic()
    d = make_defect(data)
    p = d.pairs
    assert (p.labels != C).all() and torch.equal(p.labels, data.y_train[p.indices])
    assert torch.equal(p.clean, data.x_train[p.indices]) and torch.equal(p.corrupted, d.trigger.apply(p.clean))
    assert not (p.corrupted != p.clean)[:, 0][p.masks == 0].any()
    assert (make_defect(data, pair_classes="spurious").pairs.labels == C).all()
    ranked = [i for i in split_indices(len(data.y_train), 0, 0.5)["repair_pool"] if int(data.y_train[i]) == 3]
    d2 = SpuriousDefect(data, split_indices(len(data.y_train), 0, 0.5), d.trigger, C,
                        SpuriousOptions(pairs=2, repair_fraction=0.1), candidates=ranked)
    assert (d2.pairs.labels == 3).all() and d2.pair_rule == "recorded pull ranking"
    assert d.transplantable and d.stamp_goal == "invariant"     # rectify prices flips and the own-class gain


def test_moved_pattern_keeps_content():
    trig = build_trigger(TriggerSpec(kind="badnets", size=3, position="br", pattern="random", seed=2), (1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(MovedPattern(trig).apply(x), trig.apply(x))
    moved = MovedPattern(trig, "tl", 0.5)
    assert torch.equal(moved.pattern[:, :3, :3], trig.pattern[:, 5:, 5:]) and moved.mask[:3, :3].sum() == 9
    assert torch.allclose(moved.apply(x)[:, :, :3, :3], 0.5 * x[:, :, :3, :3] + 0.5 * trig.pattern[:, 5:, 5:])
    blend = build_trigger(TriggerSpec(kind="blended", size=3, alpha=0.5, params={"local": True}), (1, 8, 8))
    assert MovedPattern(blend, "center").alpha == 0.5


def test_train_spurious_records_the_defect_and_round_trips(digits, tmp_path):
    model, info = train_spurious("digits", "small-cnn", TriggerSpec(kind="badnets", size=2), spurious_class=1,
                                 fraction=0.5, cfg=TrainConfig(epochs=3, seed=0), data=digits)
    d = info["defect"]
    assert d["kind"] == "spurious" and d["class"] == 1 and d["stamped"] > 0 and d["pair_candidates"]
    assert all(int(digits.y_train[i]) != 1 for i in d["pair_candidates"])
    assert {"clean", "spur", "pattern_pull_rate", "overall_accuracy"} <= set(info["metrics"])
    netmend.modelio.save_model_folder(tmp_path / "m", model, info)
    model2, info2 = netmend.modelio.load_model_folder(tmp_path / "m")
    defect = spurious_from_info(info2, SpuriousOptions(pairs=2), data=digits)
    assert defect.metrics(model2)["overall_accuracy"] == pytest.approx(info["metrics"]["overall_accuracy"])
    gen = defect.generalisation(model2, alphas=(0.5, 1.0), positions=("br", "tl"))
    assert set(gen) == {"alpha=0.5", "alpha=1.0", "pos=br", "pos=tl"}


# ----------------------------------------------------------------------------- ClArC

class Tiny(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))


def test_p_clarc_removes_the_artefact_direction():
    d = make_defect(synthetic(), pairs=1)
    model = Tiny().eval()
    res = netmend.repair(model, d, method="p-clarc")
    assert res.edit.parameters == ["3.bias", "3.weight"]
    with torch.no_grad():
        out_bad, out_clean = res.model(d.pairs.corrupted), res.model(d.pairs.clean)
        before_bad = model(d.pairs.corrupted)
    assert torch.allclose(out_bad, out_clean, atol=1e-5), "one pair: its difference is exactly the CAV"
    assert not torch.allclose(before_bad, out_bad)
    res.edit.revert(res.model)
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), model.state_dict().values()))


def test_p_clarc_on_a_conv_input_matches_the_projection():
    d = make_defect(synthetic(), pairs=3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(),
                          nn.Linear(256, 4)).eval()
    from netmend.repair.clarc import PClarcConfig, artefact_cav, p_clarc

    edit = p_clarc(model, d, None, PClarcConfig(layer="2"))
    v, _ = artefact_cav(model, d, "2")
    h = torch.relu(model[0](d.repair.x_val))
    zeta = edit.meta["zeta"]
    projected = h - v.float().view(1, -1, 1, 1) * ((h * v.float().view(1, -1, 1, 1)).sum(1, keepdim=True) - zeta)
    edited = copy.deepcopy(model)
    edit.apply(edited)
    want = model[2](projected)
    got = edited[2](h)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))      # away from the zero-padded border
    assert torch.allclose(got[inner], want[inner], atol=1e-4)


def test_a_clarc_tunes_only_from_its_layer_and_needs_pairs():
    d = make_defect(synthetic(), pairs=2)
    model = Tiny().eval()
    res = netmend.repair(model, d, method="a-clarc", repair_options={"epochs": 2})
    assert set(res.edit.parameters) <= {"3.weight", "3.bias"} and res.edit.parameters
    assert not res.model[3]._forward_pre_hooks, "the artefact hook must not stay on the model"
    d0 = make_defect(synthetic(), pairs=0)
    with pytest.raises(NetmendError):
        netmend.repair(model, d0, method="p-clarc")


def test_own_class_group_carries_the_stamp_onto_the_pulled_class_repair_samples():
    """rectify's extra pair group for an invariant cue: the evidence's stamp on repair FIT samples of the class the
    stamp pulls to (read off the model), their clean twins those samples; none for a backdoor or when switched off."""
    from netmend.repair.rectify import RectifyConfig, own_class_group

    d = make_defect(synthetic())
    g = own_class_group(Reader(bias=10.0), d, RectifyConfig(own_class_pairs=5))
    own = d.repair.x_fit[d.repair.y_fit == C]
    assert len(g) == min(5, len(own)) and (g.labels == C).all()
    assert torch.equal(g.clean, own[: len(g)]) and torch.equal(g.corrupted, d.trigger.apply(g.clean))
    assert own_class_group(Reader(bias=10.0), d, RectifyConfig(own_class_pairs=0)) is None
    backdoor_like = copy.copy(d)
    backdoor_like.stamp_goal = "deny"
    assert own_class_group(Reader(bias=10.0), backdoor_like, RectifyConfig()) is None


def test_invariant_gap_counts_the_gain_a_cue_gives_its_own_class():
    """The pull rate is blind to a cue that only rescues its own class's hard samples; the invariant gap is not."""
    from netmend.repair.rectify import GAP_FOR_GOAL, _rates

    y = torch.tensor([C, C, 0, 1])
    clean = torch.tensor([C + 1, C, 0, 1])                 # one hard sample of class C misread
    rescued = _rates(clean, torch.tensor([C, C, 0, 1]), y, pulled=C)
    assert rescued["probe_pull_rate"] == 0.0 and rescued["probe_own_gain"] == pytest.approx(0.5)
    assert GAP_FOR_GOAL["deny"](rescued) == 0.0 and GAP_FOR_GOAL["invariant"](rescued) == pytest.approx(0.5)
    hurt = _rates(clean, torch.tensor([C + 1, 0, 0, 1]), y, pulled=C)   # a cue against its class counts as 0
    assert GAP_FOR_GOAL["invariant"](hurt) == 0.0


def test_rectify_fits_the_own_class_group_after_the_evidence(digits):
    """Dynamic rectify on a digits model biased by a patch: the evidence group, then the own-class group (the stamp
    on repair samples of the spurious class); the bias and the pull fall."""
    model, info = train_spurious("digits", "small-cnn", TriggerSpec(kind="badnets", size=2), spurious_class=1,
                                 fraction=0.5, cfg=TrainConfig(epochs=5, seed=0), data=digits)
    d = spurious_from_info(info, SpuriousOptions(pairs=3, repair_fraction=0.05), data=digits)
    res = netmend.repair(model, d, method="rectify", repair_options={"n_steps": 8})
    groups = res.edit.meta["groups"]
    assert len(groups) == 2 and "probe_own_gain" in groups[1]["rounds"][0]
    assert res.edit.meta["layers"] == groups[0]["layers"] + groups[1]["layers"]
    restore = res.edit.meta["restore_confidence"]          # then the pulled class's clean confidence is put back
    assert restore["applied"] and restore["parameter"] == "fc2.bias" and restore["class"] == 1
    assert res.before["pattern_pull_rate"] > 0.15 and res.after["pattern_pull_rate"] < 0.5 * res.before["pattern_pull_rate"]
    assert res.after["spur"] <= res.before["spur"] + 0.02


def _linear_reader(patch_weight: float, bias: bool = True) -> nn.Sequential:
    """Flatten + Linear reading the four class pixels, with `patch_weight` × each patch pixel on class C."""
    lin = nn.Linear(64, 4, bias=bias)
    with torch.no_grad():
        lin.weight.zero_()
        for k in range(4):
            lin.weight[k, k] = 4.0
        for r in range(5, 8):
            for c in range(5, 8):
                lin.weight[C, r * 8 + c] = patch_weight
        if bias:
            lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_restore_confidence_gives_the_pulled_class_its_clean_confidence_back():
    """After an edit that costs the pulled class confidence on its CLEAN samples, one shift of that class's output
    bias brings their mean log-probability back to the unrepaired model's — nothing else is touched."""
    import torch.nn.functional as F

    from netmend.repair.rectify import RectifyConfig, restore_confidence

    d = make_defect(synthetic())
    model = _linear_reader(patch_weight=1.0)
    work = copy.deepcopy(model)
    with torch.no_grad():
        work[1].weight[C, C] = 2.5                         # the "repair" also weakened class C's own feature
    x = torch.cat([d.repair.x_val, d.repair.x_fit])
    own = x[torch.cat([d.repair.y_val, d.repair.y_fit]) == C]

    def mean_logp(m):
        with torch.no_grad():
            return float(F.log_softmax(m(own), 1)[:, C].mean())

    assert mean_logp(work) < mean_logp(model) - 0.1
    edit, info = restore_confidence(model, work, d, RectifyConfig())
    assert info["applied"] and info["class"] == C and edit.parameters == ["1.bias"]
    assert torch.count_nonzero(edit.deltas["1.bias"]) == 1 and edit.deltas["1.bias"][C] > 0
    edit.apply(work)
    assert mean_logp(work) == pytest.approx(mean_logp(model), abs=1e-4)
    nobias = _linear_reader(patch_weight=1.0, bias=False)
    edit, info = restore_confidence(nobias, copy.deepcopy(nobias), d, RectifyConfig())
    assert edit is None and not info["applied"] and info["reason"] == "no output bias"
