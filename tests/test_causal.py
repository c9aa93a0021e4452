"""CARE's causal localisation: batched interventions agree with the per-neuron loop, defaults, planted neurons."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import netmend
from netmend.defects.base import Defect, Objective, RepairData
from netmend.errors import NetmendError
from netmend.locate.causal import (CAUSAL_OUTPUTS, CausalConfig, Cut, default_layers, intervention_curves,
                                   intervention_curves_loop, intervention_curves_model_loop, locate_causal, rank)
from netmend.metrics import predict
from netmend.train import TrainConfig, fit
from netmend.zoo.models import create_model


class ToyBackdoor(Defect):
    """8 features in [0, 1]; label = [x0 + x1 > 1] + 2·[x2 > 0.5]; trigger: x7 := 3 → class 0."""

    kind = "toy"

    def __init__(self, seed: int = 0, n: int = 3000):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 8, generator=g)
        y = (x[:, 0] + x[:, 1] > 1).long() + 2 * (x[:, 2] > 0.5).long()
        self.num_classes, self.in_shape, self.target = 4, [8], 0
        self.x_train, self.y_train = x[:2000], y[:2000]
        self.repair = RepairData(x[2000:2400], y[2000:2400], x[2400:2500], y[2400:2500])
        self.x_test, self.y_test = x[2500:], y[2500:]

    @staticmethod
    def stamp(x):
        x = x.clone()
        x[:, 7] = 3.0
        return x

    def objective(self, model):
        keep = self.repair.y_fit != self.target
        xb, yb = self.stamp(self.repair.x_fit[keep]), self.repair.y_fit[keep]
        return Objective(xb, lambda z: z.argmax(-1) != yb.to(z.device), self.repair.x_fit, self.repair.y_fit)

    def metrics(self, model):
        keep = self.y_test != self.target
        return {"clean_accuracy": float((predict(model, self.x_test) == self.y_test).float().mean()),
                "asr": float((predict(model, self.stamp(self.x_test[keep])) == self.target).float().mean())}


def toy_backdoored(seed: int = 0) -> tuple[nn.Module, ToyBackdoor]:
    """A small MLP trained with 15% poisoned samples: a real, planted backdoor in under a second."""
    torch.manual_seed(seed)
    d = ToyBackdoor(seed)
    x, y = d.x_train.clone(), d.y_train.clone()
    x[:300], y[:300] = d.stamp(x[:300]), 0
    model = create_model("mlp", [8], 4, hidden=(32, 16))
    fit(model, x, y, TrainConfig(epochs=15, lr=5e-3, seed=seed))
    return model.eval(), d


@pytest.fixture(scope="module")
def toy():
    return toy_backdoored()


def test_toy_backdoor_is_planted(toy):
    model, d = toy
    m = d.metrics(model)
    assert m["asr"] > 0.9 and m["clean_accuracy"] > 0.85


def test_default_layers():
    assert default_layers(create_model("small-cnn", (1, 28, 28), 10)) == ["relu3"]
    assert default_layers(create_model("small-cnn", (1, 28, 28), 10), "features") == ["flatten"]
    assert default_layers(create_model("mlp", (13,), 2), "features") == default_layers(create_model("mlp", (13,), 2))
    with pytest.raises(NetmendError):
        default_layers(create_model("small-cnn", (1, 28, 28), 10), "middle")
    assert default_layers(create_model("mlp", (13,), 2)) == ["relu1", "relu2", "relu3", "relu4", "relu5"]


@pytest.mark.parametrize("layer", ["relu3", "fc1", "relu2", "pool1", "conv2"])
def test_batched_matches_loop_cnn(layer):
    torch.manual_seed(0)
    model = create_model("small-cnn", (1, 16, 16), 5, channels=(4, 6), hidden=12).eval()
    x = torch.rand(12, 1, 16, 16)
    cut = Cut(model, layer)
    h = cut.prefix(x)
    vals = torch.linspace(-1, 2, 3)[None].repeat(h.shape[1], 1)
    red = lambda z: torch.stack([torch.softmax(z, -1)[..., 1].mean(-1), z[..., 0].mean(-1)], -1)
    a = intervention_curves(cut, h, vals, red, max_elems=5000)      # several chunks
    b = intervention_curves_loop(cut, h, vals, red)
    assert a.shape == (h.shape[1], 3, 2)
    assert torch.allclose(a, b, atol=1e-5)
    c = intervention_curves_model_loop(model, layer, x, vals, red)   # CARE's whole-model loop with a hook
    assert torch.allclose(a, c, atol=1e-5)


def test_backdoor_default_is_flattened_features_on_cnns():
    """Backdoor on a CNN: the default layer is the first Linear's input (one neuron per channel × position),
    keep 30; cnn_layer='head' gives CARE's layer back."""
    torch.manual_seed(0)
    model = create_model("small-cnn", (1, 8, 8), 3, channels=(2, 3), hidden=6).eval()
    x = torch.rand(40, 1, 8, 8)

    class Patch(ToyBackdoor):
        kind = "backdoor"

        def __init__(self):
            self.target, self.num_classes = 0, 3
            self.repair = RepairData(x[:30], torch.randint(0, 3, (30,)), x[30:], torch.randint(0, 3, (10,)))

        @staticmethod
        def stamp(x):
            x = x.clone()
            x[..., -2:, -2:] = 1.0
            return x

    sites = locate_causal(model, Patch(), CausalConfig(samples=30))
    assert sites.details["layers"] == ["flatten"] and len(sites) == 30
    assert all(s.layer == "flatten" and 0 <= s.index < 3 * 8 * 8 for s in sites)
    head = locate_causal(model, Patch(), CausalConfig(samples=30, cnn_layer="head", keep=5))
    assert head.details["layers"] == ["relu3"] and len(head) == 5


def test_batched_dedupes_repeated_rows():
    """Repeated input rows are computed once and gathered back: same curves as the loop, row order kept."""
    torch.manual_seed(0)
    model = create_model("mlp", [5], 3, hidden=(8, 6)).eval()
    x = torch.rand(6, 5)[torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 5, 0])]
    cut = Cut(model, "relu1")
    h = cut.prefix(x)
    vals = torch.linspace(0, 1, 4)[None].repeat(h.shape[1], 1)
    red = lambda z: torch.softmax(z, -1)[..., :5, 0].mean(-1, keepdim=True) - z[..., 5:, 1].mean(-1, keepdim=True)
    a = intervention_curves(cut, h, vals, red)
    b = intervention_curves_model_loop(model, "relu1", x, vals, red)
    assert torch.allclose(a, b, atol=1e-5)


def test_localiser_batched_equals_loop_and_planted_trigger_unit(toy):
    model, d = toy
    cfg = CausalConfig(samples=200, keep=4)
    fast = locate_causal(model, d, cfg)
    slow = locate_causal(model, d, CausalConfig(samples=200, keep=4, loop=True))
    assert [(s.layer, s.index) for s in fast] == [(s.layer, s.index) for s in slow]
    for layer in fast.details["layers"]:
        assert torch.allclose(fast.details["curves"][layer], slow.details["curves"][layer], atol=1e-5)
    assert len(fast) == 4 and all(s.kind == "neuron" for s in fast)
    assert fast.details["layers"] == ["relu1", "relu2"]
    assert fast[0].score >= fast[-1].score > 0


def test_planted_neuron_ranks_first():
    """A unit that alone drives class 1 must have the largest causal effect on p_1."""
    torch.manual_seed(0)
    fc1, out = nn.Linear(4, 6), nn.Linear(6, 2)
    with torch.no_grad():
        out.weight.mul_(0.01)
        out.weight[1, 3] = 5.0
    model = nn.Sequential(OrderedDict([("fc1", fc1), ("relu1", nn.ReLU()), ("out", out)])).eval()

    class D(Defect):
        kind = "planted"

        def __init__(self):
            self.repair = RepairData(torch.randn(64, 4), torch.zeros(64, dtype=torch.long), torch.randn(8, 4),
                                     torch.zeros(8, dtype=torch.long))

        def objective(self, model):
            return Objective(self.repair.x_fit, lambda z: z.argmax(-1) == 1, self.repair.x_fit, self.repair.y_fit)

    from netmend.locate.causal import CausalOutput, Probe

    if "planted" not in CAUSAL_OUTPUTS:
        CAUSAL_OUTPUTS.add("planted", CausalOutput(
            lambda m, d, c: Probe(d.repair.x_fit, d.repair.x_fit[:0], lambda z: torch.softmax(z, -1)[..., 1:].mean(-2)),
            steps=5, keep=2))
    sites = netmend.api.locate(model, D(), "causal")
    assert (sites[0].layer, sites[0].index) == ("relu1", 3)


def test_fairness_probe_uses_flips():
    """The fairness output dy(v) is computed over an instance and its protected-attribute flips."""
    torch.manual_seed(0)
    model = create_model("mlp", [3], 2, hidden=(8, 4)).eval()

    class F(Defect):
        kind = "fairness"

        def __init__(self):
            self.x = torch.randint(0, 3, (20, 3)).float()
            self.repair = RepairData(self.x, torch.zeros(20, dtype=torch.long), self.x[:4], torch.zeros(4, dtype=torch.long))

        def flip(self, x):
            out = x.unsqueeze(1).repeat(1, 2, 1)
            out[:, :, 0] = torch.tensor([0.0, 1.0])
            return out

        def evidence(self):
            return self.x, torch.zeros(len(self.x), dtype=torch.long)

        def objective(self, model):
            return Objective(self.x, lambda z: z.argmax(-1) == 1, self.x, self.repair.y_fit)

    sites = locate_causal(model, F(), CausalConfig())
    # netmend's fairness defaults: 16 values, the 'drop' score, 13 sites among the hidden units and the input features
    assert sites.details["steps"] == 16 and sites.details["score"] == "drop" and len(sites) == 13
    assert any(s.layer == "norm" for s in sites)
    assert all(s.score >= 0 for s in sites)


def test_rank_tops_up_from_second_curve():
    scores = torch.tensor([[3.0, 0.0], [0.0, 5.0], [2.0, 1.0]])
    assert rank(scores) == [0, 2, 1]


def test_bad_steps_is_user_error(toy):
    model, d = toy
    with pytest.raises(NetmendError):
        locate_causal(model, d, CausalConfig(steps=1))


def test_specific_prefers_a_neuron_silent_where_behaviour_must_stay():
    """`specific` weights a score by the share of keep rows where the unit is zero: scaling it cannot touch them."""
    fc1, out = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        fc1.weight.copy_(torch.eye(2)), fc1.bias.zero_()        # h0 = relu(x0), h1 = relu(x1)
        out.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 4.0]])), out.bias.zero_()
    model = nn.Sequential(OrderedDict([("fc1", fc1), ("relu1", nn.ReLU()), ("out", out)])).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 2, generator=g) + 0.1                   # both units active
    keep = torch.rand(32, 2, generator=g) * torch.tensor([1.0, -1.0]) + torch.tensor([0.1, -0.1])   # only h0 active

    class D(Defect):
        kind = "specific-toy"
        repair = RepairData(x, torch.zeros(32, dtype=torch.long), x[:4], torch.zeros(4, dtype=torch.long))

        def objective(self, model):
            return Objective(x, lambda z: z.argmax(-1) == 1, keep, torch.zeros(32, dtype=torch.long))

    from netmend.locate.causal import CausalOutput, Probe

    if "specific-toy" not in CAUSAL_OUTPUTS:
        CAUSAL_OUTPUTS.add("specific-toy", CausalOutput(
            lambda m, d, c: Probe(x, x[:0], lambda z: z[..., 1].mean(-1, keepdim=True), ["y1"], keep), steps=3, keep=2))
    plain = locate_causal(model, D(), CausalConfig(layers=["relu1"]))
    spec = locate_causal(model, D(), CausalConfig(layers=["relu1"], specific=1.0))
    assert [s.index for s in plain] == [0, 1]                 # the larger effect first ...
    assert spec[0].index == 1 and spec[1].score == pytest.approx(0.0)   # ... unless it is active on every keep row
