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
