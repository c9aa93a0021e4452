"""Attribution localisation: IG completeness per site, candidate sites, ranking details, clear errors."""
from __future__ import annotations

import pytest
import torch

from netmend.defects.base import Defect, Pairs, RepairData
from netmend.errors import NetmendError
from netmend.locate.attribution import (AttributionConfig, attribution_sites, candidate_sites, layer_attribution,
                                        static_site)
from netmend.zoo.models import create_model


class ToyDefect(Defect):
    kind = "toy"

    def __init__(self, x_fit, corrupted, clean, labels, masks=None):
        self.repair = RepairData(x_fit, torch.zeros(len(x_fit), dtype=torch.long), x_fit[:4], torch.zeros(4, dtype=torch.long))
        self.pairs = Pairs(corrupted, clean, labels, masks)

    def metrics(self, model):
        return {}


def small_cnn():
    torch.manual_seed(0)
    return create_model("small-cnn", (1, 8, 8), 4, channels=(4, 6), hidden=16).eval()


def mlp():
    torch.manual_seed(0)
    return create_model("mlp", (10,), 3, hidden=(12, 8)).eval()


def stamped(n=3, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(n, *shape, generator=g)
    bad = clean.clone()
    bad[..., -2:, -2:] = 1.0
    masks = torch.zeros(n, *shape[-2:])
    masks[:, -2:, -2:] = 1
    return clean, bad, masks


@pytest.mark.parametrize("output", ["logit", "prob", "margin"])
def test_ig_completeness_small_cnn(output):
    model = small_cnn()
    clean, bad, masks = stamped()
    y = torch.tensor([1, 2, 3])
    cfg = AttributionConfig(n_steps=64, output=output)
    from netmend.locate.attribution import OUTPUTS
    with torch.no_grad():
        delta = OUTPUTS[output](model(clean), y) - OUTPUTS[output](model(bad), y)
    for cand in candidate_sites(model):
        M = layer_attribution(model, cand.point, clean, bad, y, cfg)
        total = M.flatten(1).sum(1)
        assert (total - delta).abs().max() <= 1e-2 * delta.abs().max(), cand


def test_ig_completeness_mlp_and_candidates():
    model = mlp()
    g = torch.Generator().manual_seed(1)
    x, xb = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    cands = candidate_sites(model)
    assert [c.weight for c in cands] == ["fc1", "fc2", "out"]
    assert [c.point for c in cands] == ["relu1", "relu2", "out"]
    with torch.no_grad():
        delta = model(x).gather(1, y[:, None])[:, 0] - model(xb).gather(1, y[:, None])[:, 0]
    for c in cands:
        M = layer_attribution(model, c.point, x, xb, y, AttributionConfig(n_steps=64))
        assert (M.sum(1) - delta).abs().max() <= 1e-2 * delta.abs().max()     # within 1% of the largest |ΔF|


def test_residual_candidates_are_blocks():
    model = create_model("preact-resnet18", (3, 16, 16), 10, width=8)
    cands = candidate_sites(model)
    weights = [c.weight for c in cands]
    assert weights[0] == "conv1" and weights[-1] == "linear"
    assert "layer2.0.conv2" in weights and "layer2.0.conv1" not in weights
    block = next(c for c in cands if c.weight == "layer4.1.conv2")
    assert block.point == block.value == "layer4.1"
    assert static_site(model).weight == "layer4.1.conv2"
    assert static_site(small_cnn()).weight == "fc1"


def test_sites_ranked_with_all_scores_in_details():
    model = small_cnn()
    clean, bad, masks = stamped()
    x = torch.rand(64, 1, 8, 8)
    defect = ToyDefect(x, bad, clean, torch.tensor([1, 2, 3]), masks)
    sites = attribution_sites(model, defect, AttributionConfig(n_steps=16))
    scores = [s.score for s in sites]
    assert scores == sorted(scores, reverse=True)
    assert set(sites.details["scores"]) == {"conv1", "conv2", "fc1", "fc2"}
    for name, info in sites.details["scores"].items():
        assert info["editability"] == pytest.approx(info["m_norm"] * info["d_norm"])
        assert info["completeness_error"] < 0.05
    js = sites.to_json()
    assert js["localiser"] == "attribution" and len(js["sites"]) == 4
    only = attribution_sites(model, defect, AttributionConfig(n_steps=8, layers=["fc2", "conv2"]))
    assert only.layers() and set(only.layers()) == {"fc2", "conv2"}


def test_bad_layer_names_are_clear_errors():
    model = small_cnn()
    clean, bad, masks = stamped()
    defect = ToyDefect(torch.rand(16, 1, 8, 8), bad, clean, torch.tensor([1, 2, 3]), masks)
    with pytest.raises(NetmendError, match="does not exist"):
        attribution_sites(model, defect, AttributionConfig(layers=["conv7"]))
    with pytest.raises(NetmendError, match="Linear or Conv2d"):
        attribution_sites(model, defect, AttributionConfig(layers=["relu1"]))
    with pytest.raises(NetmendError, match="unknown attribution output"):
        attribution_sites(model, defect, AttributionConfig(output="entropy"))
