"""BlockMNIST construction, the leakage metric on hand-made models, the leakage defect's pairs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from netmend.data.blockmnist import (BLOCK, BlockLayout, blank_null, draw_positions, make_blockmnist, null_block,
                                     stack_blocks, swap_blocks)
from netmend.data.datasets import ImageData, split_indices
from netmend.defects.leakage import LeakageDefect, LeakageOptions, infer_digit_top, null_attribution
from netmend.errors import NetmendError

SQUARE = null_block("square")
CENTRE = slice(11, 17)          # inside the square's hollow: synthetic digits live only here


def synthetic_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, BLOCK, BLOCK)
    x[:, :, CENTRE, CENTRE] = torch.rand(n, 1, 6, 6, generator=g) * 0.9 + 0.1
    return x, torch.arange(n) % 4


def synthetic_block_data(n_train: int = 200, n_test: int = 40) -> ImageData:
    xtr, ytr = synthetic_digits(n_train, 0)
    xte, yte = synthetic_digits(n_test, 1)
    base = ImageData("synthetic", xtr, ytr, xte, yte, [str(i) for i in range(4)])
    return make_blockmnist(base, seed=3)


def test_blocks_sit_where_the_metadata_says():
    x, _ = synthetic_digits(50)
    top = draw_positions(50, seed=7)
    assert 10 < int(top.sum()) < 40, "positions should be mixed"
    assert torch.equal(top, draw_positions(50, seed=7)), "positions must be seeded"
    img = stack_blocks(x, top, SQUARE)
    assert img.shape == (50, 1, 2 * BLOCK, BLOCK)
    for i in range(50):
        digit, null = (img[i, :, :BLOCK], img[i, :, BLOCK:]) if top[i] else (img[i, :, BLOCK:], img[i, :, :BLOCK])
        assert torch.equal(digit, x[i]) and torch.equal(null, SQUARE)
    dmask, nmask = BlockLayout(top).masks()
    assert torch.equal(dmask + nmask, torch.ones_like(dmask))
    assert torch.equal(img[:, 0] * nmask, SQUARE[0].repeat(2, 1).expand(50, -1, -1) * nmask)
    assert torch.equal(infer_digit_top(img, SQUARE), top)


def test_make_blockmnist_keeps_labels_and_records_layout():
    data = synthetic_block_data()
    assert data.in_shape == [1, 2 * BLOCK, BLOCK]
    assert data.info["digit_top_train"].dtype == torch.bool and len(data.info["digit_top_test"]) == 40
    assert torch.equal(data.y_train, torch.arange(200) % 4)
    with pytest.raises(NetmendError):
        make_blockmnist(ImageData("bad", torch.zeros(4, 1, 8, 8), torch.zeros(4).long(), torch.zeros(2, 1, 8, 8),
                                  torch.zeros(2).long(), ["0"]))
    with pytest.raises(NetmendError):
        null_block("stripes")


def _linear_model(weight_map: torch.Tensor) -> nn.Module:
    """4-class linear model whose logits read only the pixels marked in weight_map (56×28)."""
    lin = nn.Linear(2 * BLOCK * BLOCK, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 2 * BLOCK * BLOCK, generator=torch.Generator().manual_seed(0)).abs()
                         * weight_map.flatten())
    return nn.Sequential(nn.Flatten(), lin).eval()


def _centre_pixels() -> torch.Tensor:
    """The synthetic digits' pixels (inside the square's hollow) in both halves, 56×28."""
    m = torch.zeros(2 * BLOCK, BLOCK)
    m[CENTRE, CENTRE] = 1
    m[BLOCK + 11: BLOCK + 17, CENTRE] = 1
    return m


def test_leakage_metric_on_hand_made_models():
    data = synthetic_block_data()
    splits = split_indices(len(data.y_train), 0, 0.5)
    defect = LeakageDefect(data, splits, LeakageOptions(pairs=2, repair_fraction=0.1, ig_samples=40, ig_steps=8))
    square_pixels = SQUARE[0].repeat(2, 1)                 # the outline in both halves
    centre_pixels = _centre_pixels()
    leaky, honest = _linear_model(square_pixels), _linear_model(centre_pixels)
    assert defect.leakages(leaky)["leakage"] == pytest.approx(1.0, abs=1e-5)
    assert defect.leakages(honest)["leakage"] == pytest.approx(0.0, abs=1e-5)
    mixed = _linear_model(square_pixels + centre_pixels)
    share = null_attribution(mixed, defect.x_test, defect.y_test, defect.top_test, steps=8)["abs_share"]
    assert ((share > 0) & (share < 1)).all()
    m = defect.metrics(honest)
    assert 0 <= m["clean_accuracy"] <= 1 and m["leakage"] == pytest.approx(0.0, abs=1e-5) and m["n_leakage"] == 40


def test_net_leakage_keeps_signs_and_abs_share_does_not():
    """Null-block weights that cancel (+1 on the square's left half, −1 on its right): every null pixel gets
    attribution, so the |IG| share is large, but the block adds nothing to the logit, so the net share is 0."""
    data = synthetic_block_data()
    splits = split_indices(len(data.y_train), 0, 0.5)
    defect = LeakageDefect(data, splits, LeakageOptions(pairs=2, repair_fraction=0.1, ig_samples=40, ig_steps=8))
    square = SQUARE[0].repeat(2, 1)
    signed = square.clone()
    signed[:, BLOCK // 2:] *= -1                           # the outline is symmetric: equal pixel counts
    lin = nn.Linear(2 * BLOCK * BLOCK, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_((signed + _centre_pixels()).flatten().expand(4, -1))
    cancelling = nn.Sequential(nn.Flatten(), lin).eval()
    both = defect.leakages(cancelling)
    assert both["leakage"] > 0.5 and both["net_leakage"] == pytest.approx(0.0, abs=1e-4)
    leaky = _linear_model(square)
    assert defect.leakages(leaky)["net_leakage"] == pytest.approx(1.0, abs=1e-5)
    assert defect.metrics(cancelling)["net_leakage"] == pytest.approx(0.0, abs=1e-4)


def test_pairs_are_images_and_their_blanked_twins():
    data = synthetic_block_data()
    splits = split_indices(len(data.y_train), 0, 0.5)
    pool = splits["repair_pool"]
    defect = LeakageDefect(data, splits, LeakageOptions(pairs=3, repair_fraction=0.1, both_layouts=False),
                           candidates=list(reversed(pool)))
    p = defect.pairs
    assert len(p) == 3 and p.masks.shape == (3, 2 * BLOCK, BLOCK)
    top = data.info["digit_top_train"][p.indices]
    assert torch.equal(p.corrupted, data.x_train[p.indices])
    assert torch.equal(p.clean, blank_null(p.corrupted, top))
    diff = (p.corrupted != p.clean)[:, 0]
    assert not diff[p.masks == 0].any(), "the twins differ outside the null block"
    assert (p.clean[:, 0] * p.masks).abs().sum() == 0
    assert torch.equal(p.labels, data.y_train[p.indices])
    used = set(defect.repair.indices["fit"] + defect.repair.indices["val"])
    assert not used & set(p.indices), "pairs must not overlap the repair data"
    assert p.indices == [i for i in reversed(pool) if i not in used][:3], "recorded candidates come first"
    v = defect.violation(_linear_model(SQUARE[0].repeat(2, 1)), p.corrupted, p.labels)
    assert v.shape == (3,) and (v >= 0).all()


def test_both_layouts_adds_each_evidence_image_with_its_blocks_swapped():
    """Default: pair 2i is evidence image i, pair 2i + 1 the same image with digit and null block exchanged; both
    twins blank exactly their own null block."""
    data = synthetic_block_data()
    splits = split_indices(len(data.y_train), 0, 0.5)
    one = LeakageDefect(data, splits, LeakageOptions(pairs=2, repair_fraction=0.1, both_layouts=False)).pairs
    p = LeakageDefect(data, splits, LeakageOptions(pairs=2, repair_fraction=0.1)).pairs
    assert len(p) == 4 and p.indices == [one.indices[0]] * 2 + [one.indices[1]] * 2
    assert torch.equal(p.corrupted[0::2], one.corrupted) and torch.equal(p.corrupted[1::2], swap_blocks(one.corrupted))
    assert torch.equal(swap_blocks(p.corrupted[1::2]), one.corrupted)
    assert torch.equal(p.masks[1::2], 1 - one.masks) and torch.equal(p.labels[1::2], one.labels)
    assert not ((p.corrupted != p.clean)[:, 0] & (p.masks == 0)).any()       # twins differ in the null block only
    assert (p.clean[:, 0] * p.masks).abs().sum() == 0


def test_pair_groups_split_by_null_position_first_pair_first():
    """Dynamic rectification fits one layout's pairs, then the other's: groups by null-block position."""
    data = synthetic_block_data()
    splits = split_indices(len(data.y_train), 0, 0.5)
    d = LeakageDefect(data, splits, LeakageOptions(pairs=3, repair_fraction=0.1))
    groups = d.pair_groups()
    assert len(groups) == 2 and sum(len(g) for g in groups) == len(d.pairs) == 6
    first_null_top = bool(d.pairs.masks[0, 0, 0])
    for g, null_top in zip(groups, (first_null_top, not first_null_top)):
        assert (g.masks[:, 0, 0].bool() == null_top).all() and (g.masks[:, -1, 0].bool() != null_top).all()
    one = LeakageDefect(data, splits, LeakageOptions(pairs=1, repair_fraction=0.1, both_layouts=False))
    assert len(one.pair_groups()) == 1


def test_real_blockmnist(shared_data):
    from netmend.data.datasets import load_dataset

    base = load_dataset("mnist-5k", shared_data)
    data = load_dataset("blockmnist", shared_data)
    assert data.x_train.shape == (len(base.y_train), 1, 2 * BLOCK, BLOCK) and len(data.y_test) == 10000
    top = data.info["digit_top_train"][:20]
    digit = torch.where(top.view(-1, 1, 1, 1), data.x_train[:20, :, :BLOCK], data.x_train[:20, :, BLOCK:])
    assert torch.equal(digit, base.x_train[:20])


def _top_square_reader():
    """Synthetic BlockMNIST data, its leakage defect (two pairs, both layouts) and a linear model that reads the
    null square of the top half (plus the centre pixels)."""
    data = synthetic_block_data()
    splits = split_indices(len(data.y_train), 0, 0.5)
    d = LeakageDefect(data, splits, LeakageOptions(pairs=2, repair_fraction=0.2, ig_steps=8))
    top_square = SQUARE[0].repeat(2, 1)
    top_square[BLOCK:] = 0
    return data, d, _linear_model(top_square + _centre_pixels())


def test_repair_estimate_is_net_leakage_on_the_repair_images_of_the_pairs_layout():
    """A model that reads the null square of the TOP half only leaks on images whose null block is on top: the
    estimate is 1 for that layout's pairs, 0 for the other's, and ignores the test images."""
    data, d, model = _top_square_reader()
    null_top, null_bottom = sorted(d.pair_groups(), key=lambda g: -float(g.masks[0, 0, 0]))
    leaking = d.with_pairs(null_top).repair_estimate(model)
    assert d.with_pairs(null_bottom).repair_estimate(model) == pytest.approx(0.0, abs=1e-5)
    r = d.repair
    top = data.info["digit_top_train"][torch.tensor(r.indices["fit"])]
    a = null_attribution(model, r.x_fit[~top], r.y_fit[~top], top[~top], steps=8)     # fit images only
    assert leaking == pytest.approx(float(a["null_sum"].abs().mean() / a["total_sum"].abs().mean()), rel=1e-5)
    assert 0 < leaking <= 1
    assert d.repair_estimate(_linear_model(_centre_pixels())) == pytest.approx(0.0, abs=1e-5)


def test_the_gate_reads_net_leakage_on_the_validation_images_the_loop_never_sees():
    data, d, model = _top_square_reader()
    r = d.repair
    top = data.info["digit_top_train"][torch.tensor(r.indices["val"])]
    a = null_attribution(model, r.x_val, r.y_val, top, steps=8)                      # both layouts, val only
    g = d.gate_check(model)
    assert g["defect"] == pytest.approx(float(a["null_sum"].abs().mean() / a["total_sum"].abs().mean()), rel=1e-5)
    assert g["accuracy_samples"] == len(r.y_val) and "validation" in g["defect_name"]
    assert not set(r.indices["val"]) & set(r.indices["fit"])
