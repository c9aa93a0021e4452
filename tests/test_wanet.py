"""WaNet trigger: deterministic warp for a seed, unwarped cleansed twin, noise-mode poisoning, clear errors."""
import pytest
import torch

from netmend.data.triggers import TriggerSpec, build_trigger
from netmend.data.wanet import wanet_spec
from netmend.errors import NetmendError


def test_wanet_is_deterministic_for_a_seed_and_differs_across_seeds(digits):
    x = digits.x_test[:16]
    a = build_trigger(wanet_spec(seed=3), digits.in_shape).apply(x)
    b = build_trigger(wanet_spec(seed=3), digits.in_shape).apply(x)
    c = build_trigger(wanet_spec(seed=4), digits.in_shape).apply(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x) and a.min() >= 0 and a.max() <= 1


def test_wanet_cleansed_twin_is_the_unwarped_image(digits):
    from netmend.defects.backdoor import BackdoorDefect, BackdoorOptions
    from netmend.data.datasets import split_indices

    trig = build_trigger(wanet_spec(s=1.0), digits.in_shape)
    splits = split_indices(len(digits.y_train), 0, 0.3)
    d = BackdoorDefect(digits, splits, trig, 0, BackdoorOptions(pairs=3, repair_fraction=0.1))
    assert torch.equal(d.pairs.clean, digits.x_train[d.pairs.indices])
    assert torch.equal(d.pairs.corrupted, trig.apply(d.pairs.clean))
    assert trig.mask.shape == tuple(digits.in_shape[1:]) and trig.mask.sum() > 0


def test_wanet_noise_mode_poisoning(digits):
    trig = build_trigger(wanet_spec(), digits.in_shape)
    x, y = digits.x_train[:200], digits.y_train[:200]
    pidx = torch.arange(0, 200, 10)
    x2, y2, extra = trig.poison_training(x, y, pidx, 0, seed=0)
    assert (y2[pidx] == 0).all() and torch.equal(x2[pidx], trig.apply(x[pidx]))
    changed = (x2 != x).flatten(1).any(1)
    assert extra["noise_mode"] and extra["cross"] == 40 and int(changed.sum()) == 60
    rest = torch.ones(200, dtype=torch.bool)
    rest[pidx] = False
    assert torch.equal(y2[rest], y[rest])                      # noise samples keep their labels
    x3, _, _ = trig.poison_training(x, y, pidx, 0, seed=0)
    assert torch.equal(x2, x3)


def test_wanet_bad_parameters_give_clear_errors(digits):
    with pytest.raises(NetmendError, match="strength"):
        build_trigger(wanet_spec(s=0), digits.in_shape)
    with pytest.raises(NetmendError, match="unknown WaNet parameter"):
        build_trigger(TriggerSpec(kind="wanet", params={"kk": 4}), digits.in_shape)
    with pytest.raises(NetmendError, match="trigger built for images"):
        build_trigger(wanet_spec(), digits.in_shape).apply(torch.zeros(2, 3, 8, 8))
