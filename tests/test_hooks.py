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
    from netmend.repair.masked_tune import site_masks
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
        site_masks(m, Sites([Site("relu", "neuron", index=1)], "causal"), torch.rand(2, 4))
    with pytest.raises(NetmendError, match="pso: cannot bake a scale of -1 on 'relu'"):
        bake(m, {("relu", 1): -1.0}, torch.rand(2, 4))
