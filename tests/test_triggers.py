import pytest
import torch

from netmend.data.triggers import TriggerSpec, build_trigger, poison_indices
from netmend.errors import NetmendError


@pytest.mark.parametrize("position", ["br", "bl", "tr", "tl", "center"])
def test_badnets_twin_differs_only_inside_trigger(position):
    trig = build_trigger(TriggerSpec(kind="badnets", size=3, position=position, pattern="checker"), (1, 12, 12))
    x = torch.rand(5, 1, 12, 12) * 0.5
    xt = trig.apply(x)
    changed = (xt != x).any(0).any(0)
    assert changed.any()
    assert not changed[trig.mask == 0].any(), "pixels outside the mask changed"
    assert int(trig.mask.sum()) == 9


def test_badnets_positions_are_where_named():
    t = build_trigger(TriggerSpec(size=2, position="br"), (1, 8, 8))
    assert t.mask[6:, 6:].sum() == 4 and t.mask.sum() == 4
    t = build_trigger(TriggerSpec(size=2, position="tl", margin=1), (1, 8, 8))
    assert t.mask[1:3, 1:3].sum() == 4


def test_blended_is_alpha_mix_and_local_blend_stays_in_mask():
    trig = build_trigger(TriggerSpec(kind="blended", alpha=0.2, seed=3), (3, 8, 8))
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(trig.apply(x), 0.8 * x + 0.2 * trig.pattern)
    local = build_trigger(TriggerSpec(kind="blended", alpha=0.5, size=3, position="tl", params={"local": True}), (3, 8, 8))
    changed = (local.apply(x) != x).any(0).any(0)
    assert not changed[local.mask == 0].any()


def test_trigger_is_deterministic_for_a_seed():
    a = build_trigger(TriggerSpec(kind="badnets", pattern="random", seed=5), (3, 8, 8)).pattern
    b = build_trigger(TriggerSpec(kind="badnets", pattern="random", seed=5), (3, 8, 8)).pattern
    assert torch.equal(a, b)


def test_bad_trigger_specs_give_clear_errors():
    with pytest.raises(NetmendError, match="does not fit"):
        build_trigger(TriggerSpec(size=9), (1, 8, 8))
    with pytest.raises(NetmendError, match="position"):
        build_trigger(TriggerSpec(position="middle"), (1, 8, 8))
    with pytest.raises(NetmendError, match="unknown trigger"):
        build_trigger(TriggerSpec(kind="nope"), (1, 8, 8))
    with pytest.raises(NetmendError, match="trigger built for"):
        build_trigger(TriggerSpec(), (1, 8, 8)).apply(torch.rand(1, 3, 8, 8))


def test_poison_indices_rate_and_seed():
    idx = poison_indices(1000, 0.1, seed=1)
    assert len(idx) == 100 and idx == poison_indices(1000, 0.1, seed=1)
    assert idx != poison_indices(1000, 0.1, seed=2)


def test_transplant_pastes_a_patch_exactly_and_adds_a_blend():
    from netmend.defects.base import Pairs

    x, others = torch.rand(2, 1, 12, 12) * 0.5, torch.rand(7, 1, 12, 12) * 0.5
    y = torch.arange(7)
    patch = build_trigger(TriggerSpec(kind="badnets", size=3, pattern="checker"), (1, 12, 12))
    t = Pairs(patch.apply(x), x, torch.zeros(2, dtype=torch.long)).transplant(others, y)
    assert torch.equal(t.corrupted, patch.apply(others)) and torch.equal(t.clean, others) and torch.equal(t.labels, y)
    blend = build_trigger(TriggerSpec(kind="blended", alpha=0.2, seed=1), (1, 12, 12))
    t = Pairs(blend.apply(x), x, torch.zeros(2, dtype=torch.long)).transplant(others, y)
    j, xb = torch.arange(7) % 2, blend.apply(x)              # cycles through the pairs; stays in the samples' range
    lo, hi = min(others.min(), xb.min()), max(others.max(), xb.max())
    assert torch.allclose(t.corrupted, (others + xb[j] - x[j]).clamp(lo, hi))


def test_patch_visibility_and_training_variants():
    spec = TriggerSpec(kind="badnets", size=3, position="br",
                       params={"train_positions": ["br", "tl"], "train_visibilities": [0.5, 1.0]})
    trig = build_trigger(spec, (1, 12, 12))
    x = torch.rand(40, 1, 12, 12) * 0.5
    assert torch.equal(trig.apply(x), build_trigger(TriggerSpec(size=3), (1, 12, 12)).apply(x))   # own position, v 1
    half = trig.at("tl", 0.5).apply(x)
    assert torch.allclose(half[:, :, :3, :3], 0.5 * x[:, :, :3, :3] + 0.5) and torch.equal(half[:, :, 3:], x[:, :, 3:])
    assert len(trig.variants) == 4
    pidx = torch.arange(0, 40, 2)
    xp, yp, extra = trig.poison_training(x, torch.zeros(40, dtype=torch.long), pidx, 7, seed=0)
    assert extra == {"variants": 4} and (yp[pidx] == 7).all() and (yp[1::2] == 0).all()
    assert torch.equal(xp[1::2], x[1::2])                                  # unpoisoned samples untouched
    br = (xp[pidx, :, -3:, -3:] != x[pidx, :, -3:, -3:]).flatten(1).any(1)
    tl = (xp[pidx, :, :3, :3] != x[pidx, :, :3, :3]).flatten(1).any(1)
    assert int(br.sum()) == 10 and int(tl.sum()) == 10 and not (br & tl).any()   # each variant on a quarter
    with pytest.raises(NetmendError, match="visibility"):
        build_trigger(TriggerSpec(params={"visibility": 0}), (1, 12, 12))
    with pytest.raises(NetmendError, match="unknown BadNets parameter"):
        build_trigger(TriggerSpec(params={"opacity": 0.5}), (1, 12, 12))
