"""Cutting any model at a layer with torch.fx (hooks.split_at): skip connections carried across the cut, shared
parameters, the fallback for untraceable models, and CARE on a residual CNN without whole-model reruns."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
from torch import nn

import netmend
from netmend.hooks import capture, carried_at, replace_output, run_from, split_at
from netmend.locate.causal import Cut, intervention_curves, intervention_curves_model_loop
from netmend.repair.pso import ScaledModel


class TinyRes(nn.Module):
    """Conv-BN-ReLU, one residual block out = relu(bn(conv(x)) + x), max-pool, flatten, a two-layer head."""

    def __init__(self, c: int = 6, side: int = 8, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.pool, self.flatten = nn.MaxPool2d(2), nn.Flatten()
        self.fc1, self.relu3, self.fc2 = nn.Linear(c * (side // 2) ** 2, 16), nn.ReLU(), nn.Linear(16, classes)

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)) + h)
        return self.fc2(self.relu3(self.fc1(self.flatten(self.pool(h)))))


class Gated(TinyRes):
    def forward(self, x):
        if x.sum() > 0:                      # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return super().forward(x)


class Twice(TinyRes):
    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu1(self.bn2(self.conv2(h)) + h)        # relu1 called twice
        return self.fc2(self.relu3(self.fc1(self.flatten(self.pool(h)))))


class Reordered(TinyRes):
    """conv1 registered last: registration order is not the run order."""

    def __init__(self):
        super().__init__()
        self._modules["conv1"] = self._modules.pop("conv1")


def tiny(seed: int = 0, cls=TinyRes) -> nn.Module:
    torch.manual_seed(seed)
    m = cls()
    with torch.no_grad():                   # non-trivial batch-norm statistics
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    return m.eval()


LAYERS = ["conv1", "relu1", "conv2", "bn2", "relu2", "pool", "flatten", "fc1", "relu3"]


@pytest.mark.parametrize("layer", LAYERS)
def test_split_reproduces_the_model_and_the_hooked_replacement(layer):
    model, x = tiny(), torch.rand(7, 1, 8, 8)
    cut = Cut(model, layer)
    assert cut.split is None and cut.graph is not None and cut.reason is None
    h, carry = cut.prefix(x, carried=True)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(cut.suffix(h, carried=carry), ref, atol=1e-5)
        h2 = h * 1.7 - 0.2                                   # an intervened layer output
        with replace_output(model, layer, lambda _o: h2):
            ref2 = model(x)
        assert torch.allclose(cut.suffix(h2, carried=carry), ref2, atol=1e-5)
        assert torch.allclose(cut.suffix(h2, x), ref2, atol=1e-5)          # carried values computed from x
        # k copies of the rows (copy-major, as CARE's PSO and interventions lay them out): carried values tiled
        both = cut.suffix(torch.cat([h2, h]), carried=carry)
        assert torch.allclose(both, torch.cat([ref2, ref]), atol=1e-5)
        lead = cut.suffix(torch.stack([h2, h]), carried=carry)            # extra leading batch dimension
        assert lead.shape == (2, 7, 10) and torch.allclose(lead[0], ref2, atol=1e-5)
    if layer in ("conv2", "bn2"):            # inside the residual block: the block input crosses the cut
        assert cut.carries and len(carry) == 1
        with capture(model, "relu1") as cap:
            model(x)
        assert torch.equal(carry[0], cap.outputs["relu1"])
    else:
        assert not cut.carries and carry == ()
    if layer in ("pool", "flatten", "fc1", "relu3"):   # a straight chain: CARE's low-rank / rank-one paths apply
        assert cut.suffix_modules() is not None
    if layer == "flatten":
        lin, rest = cut.first_linear()
        assert lin is model.fc1


def test_parameters_are_shared_with_the_model():
    model, x = tiny(), torch.rand(5, 1, 8, 8)
    split, why = split_at(model, "bn2")
    assert why is None and split.suffix.get_submodule("fc2") is model.fc2
    assert split.prefix.get_submodule("conv1").weight is model.conv1.weight
    with torch.no_grad():
        model.conv1.weight.mul_(1.3)          # before the cut
        model.fc2.weight.add_(0.5)            # after it
        model.bn2.running_mean.add_(0.1)      # a buffer
        h, carry = split.run_prefix(x)
        assert torch.allclose(split.run_suffix(h, carry), model(x), atol=1e-5)
        out = split.run_suffix(h, carry)
        split.suffix.get_submodule("fc2").bias.add_(1.0)   # an edit through the split reaches the model
        assert torch.allclose(model(x), out + 1.0, atol=1e-5)
    assert split_at(model, "bn2")[0] is split          # cached per (model, layer): parameters need no invalidation


def test_untraceable_model_falls_back_with_a_one_line_reason(caplog):
    model, x = tiny(cls=Gated), torch.rand(4, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="netmend"):
        cut = Cut(model, "conv2")
    assert cut.graph is None and cut.split is None and not cut.cuts
    assert "data-dependent control flow" in cut.reason and "falls back" in cut.reason and "\n" not in cut.reason
    assert any(r.name == "netmend" and r.getMessage() == cut.reason for r in caplog.records)
    h = cut.prefix(x)
    with torch.no_grad():
        assert torch.allclose(cut.suffix(h, x), model(x), atol=1e-5)      # the whole-model path, still exact
        assert torch.allclose(run_from(model, "conv2", h, x), model(x), atol=1e-5)


def test_a_layer_called_twice_falls_back():
    model = tiny(cls=Twice)
    split, why = split_at(model, "relu1")
    assert split is None and "called 2 times" in why
    assert split_at(model, "conv2")[0] is not None       # other layers still split


def test_graph_module_input_is_cut_in_its_own_graph():
    model, x = tiny(), torch.rand(6, 1, 8, 8)
    gm = fx.symbolic_trace(model)
    for layer in ("conv2", "relu2", "flatten"):
        cut = Cut(gm, layer)
        assert cut.graph is not None and cut.reason is None
        h, carry = cut.prefix(x, carried=True)
        with torch.no_grad():
            assert torch.allclose(cut.suffix(h, carried=carry), model(x), atol=1e-5)
            h2 = h.flip(0)
            with replace_output(model, layer, lambda _o: h2):
                ref = model(x)
            assert torch.allclose(cut.suffix(h2, carried=carry), ref, atol=1e-5)


def test_torch_export_module_is_cut_by_module_scope():
    model, x = tiny(), torch.rand(6, 1, 8, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2)}}).module()
    split, why = split_at(ep, "conv2")
    assert why is None and len(split.carried) == 1 and split.verify(ep, x) is None
    with torch.no_grad():
        h, carry = split.run_prefix(x)
        with replace_output(model, "conv2", lambda o: o * 0.5):
            ref = model(x)
        assert torch.allclose(split.run_suffix(h * 0.5, carry), ref, atol=1e-5)


def test_onnx_converted_model_is_cut(tmp_path):
    pytest.importorskip("onnx")
    import warnings

    from netmend.formats.onnx_model import load_onnx

    model, x = tiny(), torch.rand(5, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), tmp_path / "m.onnx", dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    gm = load_onnx(str(tmp_path / "m.onnx"))[0]
    assert isinstance(gm, fx.GraphModule)
    for layer, carries in (("conv2", True), ("flatten", False)):     # batch norm folded into the convs
        cut = Cut(gm, layer)
        assert cut.reason is None and cut.carries == carries
        h, carry = cut.prefix(x, carried=True)
        with torch.no_grad():
            with replace_output(gm, layer, lambda _o: h * 0.7):
                ref = gm(x)
            assert torch.allclose(cut.suffix(h * 0.7, carried=carry), ref, atol=1e-5)


def test_run_from_uses_the_split_and_carried_values():
    model, x = tiny(), torch.rand(5, 1, 8, 8)
    with capture(model, ["bn2", "fc1"]) as cap:
        model(x)
    with torch.no_grad():
        v = cap.outputs["bn2"] * 0.3
        with replace_output(model, "bn2", lambda _o: v):
            ref = model(x)
        carry = carried_at(model, "bn2", x)
        assert carry is not None and len(carry) == 1
        assert torch.allclose(run_from(model, "bn2", v, x), ref, atol=1e-5)
        assert torch.allclose(run_from(model, "bn2", v, carried=carry), ref, atol=1e-5)
        assert carried_at(model, "fc1", x) is None                          # nothing crosses a cut in the head
        assert torch.allclose(run_from(model, "fc1", cap.outputs["fc1"]), model(x), atol=1e-5)   # no x needed


@pytest.mark.parametrize("layer", ["conv2", "relu2", "flatten"])
def test_batched_interventions_match_cares_whole_model_loop(layer):
    model, x = tiny(), torch.rand(9, 1, 8, 8)
    cut = Cut(model, layer)
    h = cut.prefix(x)
    vals = torch.linspace(-1, 2, 3)[None].repeat(h.shape[1], 1)
    red = lambda z: torch.stack([torch.softmax(z, -1)[..., 1].mean(-1), z[..., 0].mean(-1)], -1)
    a = intervention_curves(cut, h, vals, red, x, max_elems=4000)            # several chunks
    b = intervention_curves_model_loop(model, layer, x, vals, red)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("units", [[("flatten", 3), ("flatten", 50)],           # low-rank path through the head
                                   [("bn2", 1), ("bn2", 4), ("relu3", 2)],      # carried block input + a later hook
                                   [("relu3", 5), ("conv1", 0), ("conv1", 2)]])  # conv1 registered last
def test_scaled_model_cached_cut_equals_whole_model_passes(units):
    model, x = tiny(cls=Reordered), torch.rand(8, 1, 8, 8)
    assert [n for n, _ in model.named_children()][-1] == "conv1"
    x = torch.cat([x, x[:3]])                                               # repeated rows: dedupe
    scales = torch.rand(4, len(units)) * 3 - 1
    fast = ScaledModel(model, units, x)
    assert fast.h0 is not None
    a = fast.logits(scales)
    b = ScaledModel(model, units, x, cache_prefix=False).logits(scales)
    assert a.shape == (4, 11, 10) and torch.allclose(a, b, atol=1e-5)


def test_care_on_a_residual_cnn_uses_the_split(digits, caplog, monkeypatch):
    """netmend.repair(method='care') on a backdoored non-Sequential CNN: the localiser and the PSO cut the model
    with torch.fx (no fallback reason logged, the whole-model hook path never runs) and the repair works."""
    from netmend.data.datasets import split_indices
    from netmend.data.triggers import TriggerSpec, build_trigger, stamp_batched
    from netmend.defects.backdoor import BackdoorDefect, BackdoorOptions
    from netmend.locate import causal
    from netmend.train import TrainConfig, fit

    splits = split_indices(len(digits.y_train), 0)
    trigger = build_trigger(TriggerSpec(kind="badnets", size=2), digits.in_shape)
    tr = torch.tensor(splits["train"])
    x, y = digits.x_train[tr].clone(), digits.y_train[tr].clone()
    x[:150], y[:150] = stamp_batched(trigger, x[:150]), 0
    model = tiny()
    fit(model, x, y, TrainConfig(epochs=15, lr=3e-3, seed=0))
    defect = BackdoorDefect(digits, splits, trigger, 0, BackdoorOptions(pairs=1, repair_fraction=0.1))
    before = defect.metrics(model)
    assert before["asr"] > 0.8

    def no_whole_model(*_a, **_k):
        raise AssertionError("CARE reran the whole model with a hook")

    monkeypatch.setattr(causal, "replace_output", no_whole_model)
    with caplog.at_level(logging.WARNING, logger="netmend"):
        res = netmend.repair(model, defect, method="care", locate_options={"samples": 300},
                             repair_options={"iterations": 30}, seed=0)
    assert not [r for r in caplog.records if "falls back" in r.getMessage()]
    assert Cut(model, "flatten").reason is None
    assert res.sites.details["layers"] == ["flatten"]
    assert res.edit.meta["bake_error"] < 1e-3
    assert res.after["asr"] < before["asr"]
