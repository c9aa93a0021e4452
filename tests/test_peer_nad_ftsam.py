"""Peer defences NAD (Li et al., ICLR 2021) and FT-SAM (Zhu et al., ICCV 2023): they lower the digits model's ASR at a
small cost in clean accuracy, their options are checked, and their maths is what the papers write."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netmend
from netmend.errors import NetmendError
from netmend.registry import METHODS, REPAIRERS
from netmend.repair.ft_sam import sam_perturb, sam_step
from netmend.repair.nad import NADConfig, attention_layers, attention_loss, attention_map, feature_blocks
from netmend.sites import Site, Sites

# Measured on the `backdoored` fixture (seed 0, one thread): before ASR 0.995, C-Acc 0.980.
#   nad    (defaults): ASR 0.629, C-Acc 0.960     ft-sam (defaults): ASR 0.634, C-Acc 0.969
# Asserted with margins: ASR at least 20 points lower, clean accuracy at most 4 points lower.
ASR_DROP = 0.20
ACC_BOUND = 0.04


@pytest.mark.parametrize("method", ["nad", "ft-sam"])
def test_defence_lowers_asr_and_keeps_clean_accuracy(backdoored, defect, method):
    model, _ = backdoored
    snapshot = copy.deepcopy(model.state_dict())
    r = netmend.repair(model, defect, method=method)
    assert r.before["asr"] > 0.9
    assert r.after["asr"] <= r.before["asr"] - ASR_DROP, (r.before["asr"], r.after["asr"])
    assert r.after["clean_accuracy"] >= r.before["clean_accuracy"] - ACC_BOUND
    assert r.accepted and r.edit.meta["repairer"] == method and r.edit.num_changed() > 0
    for k, v in model.state_dict().items():           # the input model is never touched
        assert torch.equal(v, snapshot[k]), k
    if method == "nad":                                # small-cnn: both conv blocks, the two deepest BackdoorBench β
        assert r.edit.meta["layers"] == ["pool1", "pool2"] and r.edit.meta["betas"] == [1000.0, 1000.0]
    assert METHODS.get(method).paper


def test_nad_layer_options_are_checked_in_one_line(backdoored, defect):
    model, _ = backdoored
    for opts, msg in [({"layers": ["conv9"]}, "layer 'conv9' does not exist in the model; feature blocks: pool1, "
                                               "pool2"),
                      ({"layers": ["fc1"]}, "layer 'fc1' gives shape"),
                      ({"layers": ["conv1", "conv2"], "betas": [1.0, 2.0, 3.0]}, None),
                      ({"layers": ["pool1", "pool2", "conv1"], "betas": [1.0, 2.0]}, "3 attention layers but only 2"),
                      ({"blocks": 0}, "blocks must be ≥ 1")]:
        cfg = REPAIRERS.entry("nad").config(**opts)
        if msg is None:
            layers, betas = attention_layers(model, defect.repair.x_fit[:2], cfg)
            assert layers == ["conv1", "conv2"] and betas == [2.0, 3.0]
            continue
        with pytest.raises(NetmendError, match=msg) as err:
            attention_layers(model, defect.repair.x_fit[:2], cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(NetmendError, match="layer 'nope' does not exist"):       # through the API, before any tuning
        netmend.repair(model, defect, method="nad", repair_options={"layers": "nope"})
    with pytest.raises(NetmendError, match="unknown option"):
        netmend.repair(model, defect, method="ft-sam", repair_options={"beta": 1})
    with pytest.raises(NetmendError, match="rho must be ≥ 0"):
        netmend.repair(model, defect, method="ft-sam", repair_options={"rho": -1.0})


def test_nad_finds_feature_blocks_of_other_architectures():
    from netmend.zoo.models import create_model

    x = torch.rand(2, 3, 16, 16)
    resnet = create_model("preact-resnet18", [3, 16, 16], 10, width=8).eval()
    # conv1, layer1..4; layer4 runs on through bn and relu (2×2 maps) and stops before the 1×1 pool
    assert feature_blocks(resnet, x) == ["conv1", "layer1", "layer2", "layer3", "relu"]
    layers, betas = attention_layers(resnet, x, NADConfig())
    assert layers == ["layer2", "layer3", "relu"] and betas == [500.0, 1000.0, 1000.0]
    vgg = create_model("vgg11", [3, 32, 32], 10, width=4).eval()      # each conv's block ends at its relu / pool;
    blocks = feature_blocks(vgg, torch.rand(2, 3, 32, 32))             # the last (2×2) stops before the 1×1 pool
    assert blocks == ["pool1", "pool2", "relu3", "pool4", "relu5", "pool6", "relu7", "relu8"]
    with pytest.raises(NetmendError, match="needs a convolutional network"):
        attention_layers(create_model("mlp", [4], 3), torch.rand(2, 4), NADConfig())


def test_attention_map_is_normalised_and_matches_the_hand_computation():
    torch.manual_seed(0)
    a = torch.randn(3, 5, 4, 6)
    am = attention_map(a, p=2)
    assert am.shape == (3, 24)
    for i in range(3):                               # by hand: mean over channels of a², flattened, unit L2 norm
        m = sum(a[i, c] ** 2 for c in range(5)) / 5
        m = m.flatten() / (m.flatten().pow(2).sum().sqrt() + 1e-6)
        assert torch.allclose(am[i], m, atol=1e-6)
    assert torch.allclose(am.norm(dim=1), torch.ones(3), atol=1e-5)
    m1 = a[0].abs().mean(0)                           # p = 1: mean of |a| over channels
    assert torch.allclose(attention_map(a, p=1)[0] * (m1.norm() + 1e-6), m1.flatten(), atol=1e-5)
    b = torch.randn(3, 5, 4, 6)
    assert torch.allclose(attention_loss(a, b), ((attention_map(a) - attention_map(b)) ** 2).mean())
    assert attention_loss(a, 7 * a) < 1e-10           # scale-free: only where the network looks counts


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    return net, x, y


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_ascent_moves_exactly_rho_along_the_normalised_gradient(adaptive):
    net, x, y = _tiny()
    params = list(net.parameters())
    F.cross_entropy(net(x), y).backward()
    w0 = [p.detach().clone() for p in params]
    g = torch.cat([p.grad.flatten() for p in params])
    w = torch.cat([p.flatten() for p in w0])
    rho = 0.3
    eps = sam_perturb(params, rho, adaptive)
    moved = torch.cat([(p.detach() - q).flatten() for p, q in zip(params, w0)])
    if adaptive:                                       # ASAM: ε = ρ·w²⊙g / ‖|w|⊙g‖, a step of ρ in |w|-scaled space
        assert torch.allclose(moved, rho * w ** 2 * g / (w.abs() * g).norm(), atol=1e-6)
        nz = w != 0
        assert torch.allclose((moved[nz] / w[nz].abs()).norm(), torch.tensor(rho), atol=1e-5)
    else:                                              # SAM: ε = ρ·g/‖g‖
        assert torch.allclose(moved, rho * g / g.norm(), atol=1e-6)
        assert torch.allclose(moved.norm(), torch.tensor(rho), atol=1e-6)
    assert torch.allclose(torch.cat([e.flatten() for e in eps]), moved, atol=1e-6)


def test_sam_step_descends_with_the_gradient_taken_at_the_ascended_weights():
    net, x, y = _tiny()
    ref = copy.deepcopy(net)
    rho, lr = 0.3, 0.1
    # by hand: ε = ρ g/‖g‖ at w; g' = ∇L(w + ε); w_new = w − lr·g'
    F.cross_entropy(ref(x), y).backward()
    g = [p.grad.clone() for p in ref.parameters()]
    norm = torch.cat([v.flatten() for v in g]).norm()
    with torch.no_grad():
        for p, v in zip(ref.parameters(), g):
            p.add_(rho * v / norm)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    expected = [(q.detach() - rho * v / norm) - lr * q.grad for q, v in zip(ref.parameters(), g)]
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss = sam_step(list(net.parameters()), lambda: F.cross_entropy(net(x), y), opt, rho, adaptive=False)
    assert loss.requires_grad is False and float(loss) > 0
    for p, e in zip(net.parameters(), expected):
        assert torch.allclose(p.detach(), e, atol=1e-6)


def test_ft_sam_at_sites_tunes_only_the_masked_weights(backdoored, defect):
    model, _ = backdoored
    sites = Sites([Site("fc1", "neuron", 1.0, index=2)], "test")
    cfg = REPAIRERS.entry("ft-sam").config(epochs=2)
    edit = REPAIRERS.get("ft-sam")(model, defect, sites, cfg)
    assert set(edit.deltas) <= {"fc1.weight", "fc1.bias"} and "fc1.weight" in edit.deltas
    rows = edit.deltas["fc1.weight"].abs().sum(1)
    assert rows[2] > 0 and float(rows.sum() - rows[2]) == 0.0
