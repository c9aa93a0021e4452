"""Backdoor evidence pairs are observed failures: `prepare(model)` picks candidates whose stamp the model obeys."""
import pytest
import torch
from torch import nn

from netmend.data.datasets import split_indices
from netmend.data.triggers import TriggerSpec, build_trigger
from netmend.defects.backdoor import BackdoorDefect, BackdoorOptions


class FiresOnBright(nn.Module):
    """Sends an input to class 0 when its mean brightness is above `cut`, else to class 1: a backdoor that fires on
    only part of the stamped inputs, as SIG does at a low amplitude."""

    def __init__(self, cut: float, classes: int = 10):
        super().__init__()
        self.cut, self.classes = cut, classes

    def forward(self, x):
        bright = (x.flatten(1).mean(1) > self.cut).long()
        return nn.functional.one_hot(1 - bright, self.classes).float()


def _defect(digits, **kw):
    trig = build_trigger(TriggerSpec(kind="blended", alpha=0.2), digits.in_shape)
    splits = split_indices(len(digits.y_train), 0, 0.3)
    return BackdoorDefect(digits, splits, trig, 0, BackdoorOptions(**{"pairs": 5, "repair_fraction": 0.1, **kw})), trig


def test_prepare_picks_pairs_whose_stamp_fires_in_candidate_order(digits):
    d, trig = _defect(digits)
    first = list(d.pairs.indices)
    cand = d._candidates[:400]
    brightness = trig.apply(digits.x_train[cand]).flatten(1).mean(1)
    model = FiresOnBright(float(brightness.median()))          # about half of the stamped candidates fire
    fires = [i for i, b in zip(cand, brightness.tolist()) if b > model.cut]
    d.prepare(model)
    assert d.pairs.indices == fires[:5] and d.pairs_firing == 5 and d.describe()["pairs_firing"] == 5
    assert (model(d.pairs.corrupted).argmax(1) == 0).all()
    assert torch.equal(d.pairs.corrupted, trig.apply(digits.x_train[fires[:5]]))
    assert torch.equal(d.pairs.labels, digits.y_train[fires[:5]]) and (d.pairs.labels != 0).all()
    assert first != d.pairs.indices            # the seeded first candidates include some that do not fire


def test_prepare_fills_with_other_candidates_when_too_few_fire_and_can_be_turned_off(digits):
    d, _ = _defect(digits)
    d.prepare(FiresOnBright(float("inf")))                     # fires on nothing
    assert d.pairs_firing == 0 and d.pairs.indices == d._candidates[:5]
    off, _ = _defect(digits, pairs_that_fire=False)
    first = list(off.pairs.indices)
    off.prepare(FiresOnBright(-1.0))                           # fires on everything: the pairs stay as drawn
    assert off.pairs.indices == first and off.pairs_firing == 5


def test_pairs_only_leaves_the_pairs_as_the_whole_tuning_set_and_keeps_validation(digits):
    full, _ = _defect(digits)
    only, _ = _defect(digits, pairs_only=True)
    assert len(only.repair.x_fit) == 0 and only.repair.indices["fit"] == []
    assert torch.equal(only.repair.x_val, full.repair.x_val) and only.repair.indices["val"] == full.repair.indices["val"]
    x, y = only.tuning_set(True)
    assert torch.equal(x, only.pairs.clean) and torch.equal(y, only.pairs.labels) and len(y) == 5


def test_pairs_only_without_pairs_is_a_one_line_error(digits):
    from netmend.errors import NetmendError

    with pytest.raises(NetmendError, match="pairs_only needs evidence pairs") as e:
        _defect(digits, pairs=0, pairs_only=True)
    assert "\n" not in str(e.value)
