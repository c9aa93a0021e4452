"""The complete verifier (netmend.verify): sound bounds, verified / violated / unknown, the CLI function."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from netmend.data.vnnlib import Property
from netmend.errors import NetmendError
from netmend.verify import crown_bounds, interval_bounds, relu_chain, verify
from netmend.verify.bounds import gradient_interval, intermediate_bounds, optimise_combination

F64 = torch.float64


def _random_net(seed: int, sizes=(4, 16, 16, 12, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(1, len(sizes)):
        layers.append(nn.Linear(sizes[i - 1], sizes[i]))
        if i < len(sizes) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_are_sound_and_crown_tighter(seed):
    net = relu_chain(_random_net(seed))
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(6, 4, generator=g, dtype=F64)
    widths = torch.tensor([0.6, 0.3, 1.0, 0.0], dtype=F64)                     # the last input is fixed
    hi = lo + torch.rand(6, 4, generator=g, dtype=F64) * widths
    x = lo.unsqueeze(1) + torch.rand(6, 10_000 // 6 + 1, 4, generator=g, dtype=F64) * (hi - lo).unsqueeze(1)
    y = net.forward(x)                                                       # (6, N, 3)
    _, (il, iu) = interval_bounds(net, lo, hi)
    eps = 1e-12
    assert (y >= il.unsqueeze(1) - eps).all() and (y <= iu.unsqueeze(1) + eps).all()
    for mode in ("forward", "crown", "crown-full"):
        for alpha in (0, 4):
            b = crown_bounds(net, lo, hi, mode=mode, upper=True, alpha_steps=alpha)
            assert (y >= b.lower.unsqueeze(1) - eps).all(), (mode, alpha)
            assert (y <= b.upper.unsqueeze(1) + eps).all(), (mode, alpha)
            # the linear lower bound itself holds pointwise: y ≥ coef·x + const
            lin = (x @ b.coef.transpose(1, 2)) + b.const.unsqueeze(1)
            assert (y >= lin - eps).all()
            assert (b.upper - b.lower).mean() <= (iu - il).mean() + eps, (mode, alpha)
    # the optimised row combination (λ, α) stays below the sampled max over the rows
    C, d = torch.randn(3, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    tol = torch.full((3,), 1e-9, dtype=F64)
    pre = intermediate_bounds(net, lo, hi, "crown")
    best = optimise_combination(net, pre, lo, hi, C, d, tol, torch.full((6, 3), 1 / 3, dtype=F64), steps=8)
    rows = (y @ C.T + d - tol).amax(-1)                                      # (6, N)
    assert (best.unsqueeze(1) <= rows + eps).all()
    plain = crown_bounds(net, lo, hi, C.mean(0, keepdim=True), d.mean(0, keepdim=True), pre=pre).lower[:, 0] - 1e-9
    assert (best >= plain - eps).all()                                       # start point included: never worse
    # intermediate bounds of every mode contain the sampled pre-activations
    for mode in ("interval", "forward", "crown", "crown-full"):
        pre = intermediate_bounds(net, lo, hi, mode)
        h = x
        for k, (l, u) in enumerate(pre):
            z = h @ net.weights[k].T + net.biases[k]
            assert (z >= l.unsqueeze(1) - eps).all() and (z <= u.unsqueeze(1) + eps).all(), (mode, k)
            h = z.clamp_min(0)
    # the interval gradient contains the true gradient at sampled points
    gl, gu = gradient_interval(net, intermediate_bounds(net, lo, hi, "crown"), torch.eye(3, dtype=F64))
    xs = x[:, :50].clone().requires_grad_(True)
    for r in range(3):
        (gx,) = torch.autograd.grad(net.forward(xs)[..., r].sum(), xs)
        assert (gx >= gl[:, r].unsqueeze(1) - eps).all() and (gx <= gu[:, r].unsqueeze(1) + eps).all()


def test_relu_chain_reads_and_refuses():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Linear(4, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 2), nn.ReLU())
    rn = relu_chain(m)
    x = torch.randn(50, 3)
    assert torch.allclose(rn.forward(x.double()), m(x).double(), atol=1e-5)
    assert len(rn.weights) == 3              # Linear∘Linear folded, ReLU∘ReLU merged, output ReLU kept
    with pytest.raises(NetmendError) as e:
        relu_chain(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    assert "Tanh" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NetmendError, match="Conv2d"):
        verify(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(1, 1)), _abs_property(-0.01))


def _abs_net() -> nn.Sequential:
    """y = 0.5 relu(x) + 1.5 relu(−x) = |x| − x/2 ≥ 0 (zero only at x = 0); a second input is ignored."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        m[0].bias.zero_()
        m[2].weight.copy_(torch.tensor([[0.5, 1.5]]))
        m[2].bias.zero_()
    return m


def _abs_property(c: float, lower: bool = True, boxes=None) -> Property:
    """lower: unsafe iff y ≤ c (C = [1], d = −c); else unsafe iff y ≥ c (C = [−1], d = c)."""
    cc, dd = (torch.tensor([[1.0]]), torch.tensor([-c])) if lower else (torch.tensor([[-1.0]]), torch.tensor([c]))
    bx = boxes or [(torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 1.0]))]
    return Property("abs", bx, [(cc, dd)], 2, 1)


def test_verified_needs_splitting():
    m = _abs_net()
    prop = _abs_property(-0.01)                       # |x| − x/2 ≤ −0.01 never happens
    root = crown_bounds(relu_chain(m), torch.tensor([[-1.0, 0.0]], dtype=F64), torch.tensor([[2.0, 1.0]], dtype=F64))
    assert float(root.lower) < -0.01                  # the unsplit relaxation cannot prove it ...
    r = verify(m, prop, timeout=20, root_alpha=0)
    assert r.status == "verified" and r.counterexample is None
    assert r.boxes > 1 and r.lower_bound > 0          # ... the split boxes can
    r = verify(m, prop, timeout=20)                   # ... and so do alpha-CROWN slopes on the unsplit box
    assert r.status == "verified" and r.boxes == 1 and r.lower_bound > 0


def test_violated_with_checked_counterexample():
    m = _abs_net()
    prop = _abs_property(1.49, lower=False)           # y ≥ 1.49 only near x = −1 (y(−1) = 1.5)
    for starts in (512, 0):                           # the falsifier, then branch and bound alone
        r = verify(m, prop, timeout=20, falsifier_starts=starts)
        assert r.status == "violated", starts
        x = r.counterexample
        assert bool(prop.in_box(x)) and bool(prop.violated(m(x.unsqueeze(0)))[0])
        assert torch.allclose(r.output, m(x.unsqueeze(0))[0].detach())
    assert r.found_by.startswith("bab")


def test_union_of_boxes_and_timeout():
    m = _abs_net()
    safe = (torch.tensor([0.5, 0.0]), torch.tensor([1.0, 1.0]))      # y ∈ [0.25, 0.5]
    bad = (torch.tensor([-1.0, 0.0]), torch.tensor([-0.9, 1.0]))     # y ∈ [1.35, 1.5]
    r = verify(m, _abs_property(1.4, lower=False, boxes=[safe, bad]), timeout=20, falsifier_starts=0)
    assert r.status == "violated" and float(r.counterexample[0]) <= -0.9
    assert verify(m, _abs_property(1.4, lower=False, boxes=[safe]), timeout=20).status == "verified"
    r = verify(m, _abs_property(-0.01), timeout=0.0)
    assert r.status == "unknown" and "timeout" in r.reason


def test_multi_row_disjuncts():
    """Two outputs y = (x1, −x1): unsafe iff (y0 ≤ 0 and y1 ≤ 0), i.e. only x1 = 0; the box x1 ∈ [0.1, 1] is
    safe, [−1, 1] is not (the tie at 0 counts as unsafe)."""
    m = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        m[0].bias.zero_()
    unsafe = [(torch.eye(2), torch.zeros(2))]
    p_safe = Property("p", [(torch.tensor([0.1, 0.0]), torch.tensor([1.0, 1.0]))], unsafe, 2, 2)
    assert verify(m, p_safe, timeout=10).status == "verified"
    p_bad = Property("p", [(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 1.0]))], unsafe, 2, 2)
    r = verify(m, p_bad, timeout=10)
    assert r.status == "violated" and float(r.counterexample[0]) == 0.0


def test_cli_function_json_and_exit_codes(tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from netmend.verify.command import verify_command

    m = _abs_net()
    path = tmp_path / "net.onnx"
    pytest.importorskip("onnx")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, torch.zeros(1, 2), str(path), dynamo=False)
    except Exception as exc:                            # pragma: no cover - exporter not available
        pytest.skip(f"onnx export unavailable: {exc}")
    vn = tmp_path / "p.vnnlib"
    vn.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                  "(assert (>= X_0 -1.0))\n(assert (<= X_0 2.0))\n(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n"
                  "(assert (>= Y_0 1.49))\n")
    app = typer.Typer()
    app.command()(verify_command)
    res = CliRunner().invoke(app, [str(path), "--property", str(vn), "--json", "--timeout", "20"])
    if res.exception and not isinstance(res.exception, SystemExit):
        if isinstance(res.exception, NetmendError):
            pytest.skip(f"this ONNX export is not read as a Linear/ReLU chain: {res.exception}")
        raise res.exception
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.exit_code == 1 and out["status"] == "violated" and len(out["counterexample"]["input"]) == 2
    vn.write_text(vn.read_text().replace("(>= Y_0 1.49)", "(>= Y_0 1.6)"))
    res = CliRunner().invoke(app, [str(path), "--property", str(vn), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["status"] == "verified"
    res = CliRunner().invoke(app, [str(path), "--property", str(vn), "--timeout", "0"])
    assert res.exit_code == 3 and "unknown" in res.stdout


# ---------------------------------------------------------------- ACAS Xu (shared data)

def _acas(shared_data, net: str, prop: int):
    from netmend.defects.safety import resolve_property
    from netmend.modelio import load_any_model

    model, _ = load_any_model(shared_data / "acasxu" / "onnx" / f"ACASXU_run2a_{net}_batch_2000.onnx")
    return model, resolve_property(str(shared_data / "acasxu" / "vnnlib" / f"prop_{prop}.vnnlib"))


@pytest.mark.parametrize("net,prop", [("1_1", 4), ("1_1", 3)])
def test_acasxu_verified(shared_data, net, prop):
    model, p = _acas(shared_data, net, prop)
    r = verify(model, p, timeout=30)
    assert r.status == "verified", r
    assert r.lower_bound > 0 and r.seconds < 30
    x = p.sample(20_000, torch.Generator().manual_seed(0))     # no sampled counterexample either
    with torch.no_grad():
        assert not p.violated(model(x)).any()


def test_acasxu_verified_with_optimised_bounds(shared_data):
    """The λ/α optimisation from the first round (opt_after=0) proves φ3 on N1,1 with no more sub-boxes."""
    model, p = _acas(shared_data, "1_1", 3)
    plain = verify(model, p, timeout=30, opt_steps=0)
    opt = verify(model, p, timeout=30, opt_after=0.0)
    assert plain.status == opt.status == "verified"
    assert opt.boxes <= plain.boxes


def test_acasxu_violated(shared_data):
    model, p = _acas(shared_data, "2_9", 8)
    r = verify(model, p, timeout=30)
    assert r.status == "violated"
    x = r.counterexample
    with torch.no_grad():
        assert bool(p.in_box(x)) and bool(p.violated(model(x.unsqueeze(0)))[0])
