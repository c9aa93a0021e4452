import pytest
import torch

from netmend.errors import NetmendError
from netmend.hooks import capture, replace_output, run_from, run_to, split_sequential, weight_layers
from netmend.zoo.models import create_model


@pytest.fixture()
def cnn():
    torch.manual_seed(0)
    return create_model("small-cnn", (1, 8, 8), 10).eval()


def test_capture_linear_and_conv(cnn):
    x = torch.rand(4, 1, 8, 8)
    with capture(cnn, ["conv2", "fc1"]) as cap:
        cnn(x)
    assert cap.inputs["conv2"].shape == (4, 32, 8, 8) and cap.outputs["conv2"].shape == (4, 64, 8, 8)
    assert torch.allclose(cap.outputs["fc1"], cnn.fc1(cap.inputs["fc1"]))


def test_replace_output_changes_the_prediction_path(cnn):
    x = torch.rand(3, 1, 8, 8)
    with replace_output(cnn, "relu3", lambda h: torch.zeros_like(h)):
        out = cnn(x)
    assert torch.allclose(out, cnn.fc2.bias.expand(3, -1))


def test_run_to_and_run_from_recompose_the_model(cnn):
    x = torch.rand(3, 1, 8, 8)
    h = run_to(cnn, "relu2", x)
    assert torch.allclose(run_from(cnn, "relu2", h), cnn(x), atol=1e-6)
    prefix, suffix = split_sequential(cnn, "fc1")
    assert torch.allclose(suffix(prefix(x)), cnn(x), atol=1e-6)


def test_run_from_on_a_non_sequential_model_uses_hooks():
    torch.manual_seed(0)
    net = create_model("preact-resnet18", (3, 8, 8), 4, width=8).eval()
    x = torch.rand(2, 3, 8, 8)
    h = run_to(net, "layer3", x)
    assert torch.allclose(run_from(net, "layer3", h, x), net(x), atol=1e-5)
    assert "layer4.1.conv2" in weight_layers(net)


def test_unknown_layer_is_a_clear_error(cnn):
    with pytest.raises(NetmendError, match="does not exist"):
        with capture(cnn, "conv9"):
            pass


def test_reader_of_finds_the_weights_reading_a_layer_or_says_why_not():
    from collections import OrderedDict

    from torch import nn

    from netmend.hooks import input_block, reader_of
    from netmend.repair.pso import bake
    from netmend.sites import Site, Sites

    m = nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 6)), ("relu", nn.ReLU()), ("soft", nn.Softmax(1)),
                                   ("fc2", nn.Linear(6, 3)), ("act", nn.ReLU())]))
    assert reader_of(m, "relu", (nn.ReLU, nn.Softmax))[0] == "fc2"
    with pytest.raises(NetmendError, match="through 'soft'"):
        reader_of(m, "relu", (nn.ReLU,))
    with pytest.raises(NetmendError, match="no Linear/Conv2d after 'act'"):
        reader_of(m, "act", (nn.ReLU,))
    with pytest.raises(NetmendError, match="not a leaf"):
        reader_of(nn.Sequential(OrderedDict([("block", m)])), "block", (nn.ReLU,))
    with pytest.raises(NetmendError, match="cannot feed a Linear taking 6 inputs"):
        input_block(m.fc2, 4, 0)
    # the same messages reach the repairers' users
    with pytest.raises(NetmendError, match="through 'soft'"):
        Sites([Site("relu", "neuron", index=1)], "causal").masks(m, torch.rand(2, 4))
    with pytest.raises(NetmendError, match="pso: cannot bake a scale of -1 on 'relu'"):
        bake(m, {("relu", 1): -1.0}, torch.rand(2, 4))


# ----------------------------------------------------------------------------- hooks.py is the one home of hooks

def test_no_module_but_hooks_registers_a_raw_hook():
    from pathlib import Path

    import netmend

    raw = ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
           "register_full_backward_pre_hook", ".register_hook(")
    root = Path(netmend.__file__).parent
    found = [f"{p.relative_to(root)}: {r}" for p in sorted(root.rglob("*.py")) if p != root / "hooks.py"
             for r in raw if r in p.read_text(encoding="utf-8")]
    assert not found, f"raw hook registrations outside netmend/hooks.py: {found}"


class _Boom(Exception):
    pass


def _no_hooks(m):
    return not m._forward_hooks and not m._forward_pre_hooks


def test_forward_hook_and_forward_hooks_remove_their_handles(cnn):
    from netmend.hooks import forward_hook, forward_hooks

    x = torch.rand(2, 1, 8, 8)
    seen = []
    with forward_hook(cnn.fc1, lambda _m, _i, o: seen.append(o)):
        out = cnn(x)
    assert len(seen) == 1 and torch.allclose(cnn.fc2(cnn.relu3(seen[0])), out) and _no_hooks(cnn.fc1)
    with forward_hook(cnn.fc1, lambda _m, _i, o: torch.zeros_like(o)):       # a returned value replaces the output
        assert torch.allclose(cnn(x), cnn.fc2.bias.expand(2, -1))
    with pytest.raises(_Boom), forward_hook(cnn.fc1, lambda *_a: None):
        raise _Boom
    assert _no_hooks(cnn.fc1)
    order = []
    with forward_hooks([(cnn.fc2, lambda *_a: order.append("fc2")), (cnn.conv1, lambda *_a: order.append("conv1"))]):
        cnn(x)
    assert order == ["conv1", "fc2"] and _no_hooks(cnn.fc2) and _no_hooks(cnn.conv1)
    with pytest.raises(_Boom), forward_hooks([(cnn.fc2, lambda *_a: None), (cnn.conv1, lambda *_a: None)]):
        raise _Boom
    assert _no_hooks(cnn.fc2) and _no_hooks(cnn.conv1)
    # a hook that raises inside the forward pass: handles still removed
    def boom(*_a):
        raise _Boom
    with pytest.raises(_Boom), forward_hooks([(cnn.fc1, lambda *_a: None), (cnn.fc2, boom)]):
        cnn(x)
    assert _no_hooks(cnn.fc1) and _no_hooks(cnn.fc2)


def test_pre_hook_removes_its_handle(cnn):
    from netmend.hooks import pre_hook

    x = torch.rand(2, 1, 8, 8)
    with pre_hook(cnn.fc2, lambda _m, inp: (torch.zeros_like(inp[0]),)):   # a returned tuple replaces the input
        assert torch.allclose(cnn(x), cnn.fc2.bias.expand(2, -1))
    assert _no_hooks(cnn.fc2) and not torch.allclose(cnn(x), cnn.fc2.bias.expand(2, -1))
    with pytest.raises(_Boom), pre_hook(cnn.fc2, lambda *_a: None):
        raise _Boom
    assert _no_hooks(cnn.fc2)


def test_add_forward_hook_and_add_pre_hook_return_live_handles(cnn):
    from netmend.hooks import add_forward_hook, add_pre_hook

    x = torch.rand(2, 1, 8, 8)
    calls = []
    hf = add_forward_hook(cnn.fc1, lambda *_a: calls.append("forward"))
    hp = add_pre_hook(cnn.fc1, lambda *_a: calls.append("pre"))
    cnn(x)
    cnn(x)
    assert calls == ["pre", "forward"] * 2                  # stays registered across forwards
    hf.remove()
    hp.remove()
    cnn(x)
    assert calls == ["pre", "forward"] * 2 and _no_hooks(cnn.fc1)


def test_execution_order_lists_weight_layers_as_run_and_leaves_no_hook():
    from netmend.hooks import execution_order, weight_layers
    from netmend.editing import execution_order as from_editing

    assert from_editing is execution_order
    torch.manual_seed(0)
    net = create_model("preact-resnet18", (3, 8, 8), 4, width=8).eval()
    order = execution_order(net, torch.rand(5, 3, 8, 8))
    assert sorted(order) == sorted(weight_layers(net)) and len(set(order)) == len(order)
    assert order[0] == weight_layers(net)[0] and all(_no_hooks(m) for m in net.modules())
    torch.manual_seed(0)
    cnn = create_model("small-cnn", (1, 8, 8), 10)
    assert execution_order(cnn, torch.rand(3, 1, 8, 8)) == ["conv1", "conv2", "fc1", "fc2"]
