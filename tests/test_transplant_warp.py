"""Carrying a warp trigger (WaNet) onto other images: fitted from the pairs, not added as a difference."""
import pytest
import torch
import torch.nn.functional as F

from netmend.data.triggers import TriggerSpec, build_trigger
from netmend.data.wanet import wanet_spec
from netmend.defects.base import Pairs
from netmend.defects.transplant import fit_warp, identity_grid, resample


def smooth_images(n: int, c: int, h: int, seed: int) -> torch.Tensor:
    """Textured images (bicubic-upsampled noise): a warp shows everywhere on them, as on natural images."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, c, 7, 7, generator=g), size=(h, h), mode="bicubic",
                         align_corners=True).clamp(0, 1)


@pytest.mark.parametrize("c,h,n", [(1, 28, 1), (3, 32, 5)])
def test_a_wanet_warp_fitted_from_the_pairs_reproduces_the_trigger_on_other_images(c, h, n):
    trig = build_trigger(wanet_spec(k=4, s=0.5, seed=3), (c, h, h))
    x, others = smooth_images(n, c, h, 0), smooth_images(16, c, h, 1)
    pairs = Pairs(trig.apply(x), x, torch.zeros(n, dtype=torch.long))
    t = pairs.transplant(others, torch.arange(16))
    true_change = (trig.apply(others) - others).norm()
    assert pairs.warp is not None and pairs.warp.r2 >= 0.99 and pairs.warp.k <= 4
    assert (t.corrupted - trig.apply(others)).norm() < 0.1 * true_change       # the attack's own warp, nearly
    added = (others + (pairs.corrupted - pairs.clean)[torch.arange(16) % n]).clamp(0, 1)
    assert (added - trig.apply(others)).norm() > 0.9 * true_change             # what adding x̃ − x would carry
    assert pairs.carried_as().startswith("warp (k = ")
    assert torch.equal(t.clean, others) and torch.equal(t.labels, torch.arange(16))


def test_a_fitted_warp_is_exact_where_the_pairs_are_a_warp_of_the_fitted_kind():
    x = smooth_images(3, 1, 24, 2)
    ctrl = torch.tensor([[[[0.02, -0.03], [0.01, 0.04]], [[-0.02, 0.03], [0.03, -0.01]]]])
    grid = identity_grid(24, 24) + F.interpolate(ctrl, size=(24, 24), mode="bicubic",
                                                 align_corners=True).permute(0, 2, 3, 1)
    w = fit_warp(x, resample(x, grid).clamp(0, 1))
    assert w is not None and w.k == 2 and w.r2 > 0.999


@pytest.mark.parametrize("spec", [TriggerSpec(kind="blended", alpha=0.2, seed=1), TriggerSpec(kind="sig")])
def test_dense_differences_that_no_warp_explains_are_added(spec):
    x, others = smooth_images(4, 1, 28, 3), smooth_images(6, 1, 28, 4)
    trig = build_trigger(spec, (1, 28, 28))
    pairs = Pairs(trig.apply(x), x, torch.zeros(4, dtype=torch.long))
    assert pairs.warp is None and pairs.carried_as() == "add"
    t = pairs.transplant(others, torch.arange(6))
    xb = trig.apply(x)
    j = torch.arange(6) % 4
    lo, hi = min(others.min(), xb.min()), max(others.max(), xb.max())
    assert torch.allclose(t.corrupted, (others + xb[j] - x[j]).clamp(lo, hi), atol=1e-6)


def test_a_patch_is_pasted_without_fitting_a_warp():
    x = smooth_images(2, 1, 12, 5)
    patch = build_trigger(TriggerSpec(kind="badnets", size=3, pattern="checker"), (1, 12, 12))
    pairs = Pairs(patch.apply(x), x, torch.zeros(2, dtype=torch.long))
    assert pairs.warp is None and pairs.carried_as() == "paste"
