"""CARE's PSO repair: the optimiser itself, bounds, baking scales into weights, the `care` preset."""
from __future__ import annotations

import copy

import pytest
import torch

import netmend
from netmend.errors import NetmendError
from netmend.locate.causal import CausalConfig, locate_causal
from netmend.repair.pso import PSOConfig, ScaledModel, bake, periodic, pso_minimise, repair_pso
from netmend.zoo.models import create_model

from test_causal import toy_backdoored


@pytest.fixture(scope="module")
def toy():
    return toy_backdoored()


def test_pso_finds_known_minimum():
    """CARE's constants (w=0.8, c1=c2=0.41) on a shifted sphere; the optimum lies away from the wrap-around
    bounds (periodic bounds send a particle that overshoots a nearby bound to the far side)."""
    target = torch.tensor([0.3, -0.7, 0.5, 0.9])
    f = lambda p: ((p - target) ** 2).sum(1) + 1.0
    init = torch.rand(20, 4, generator=torch.Generator().manual_seed(0)) * 10 - 5
    res = pso_minimise(f, init, torch.full((4,), -5.0), torch.full((4,), 5.0), iterations=200, ftol=1e-9,
                       ftol_iter=20, seed=0)
    assert torch.allclose(res.best_pos, target, atol=1e-2)
    assert abs(res.best_cost - 1.0) < 1e-4
    assert all(a >= b for a, b in zip(res.trace, res.trace[1:]))      # best cost never rises


def test_pso_seeded_and_bounded():
    seen = []

    def f(p):
        seen.append(p.clone())
        return (p ** 2).sum(1) * torch.cos(3 * p).sum(1)

    lo, hi = torch.tensor([-0.5, 0.0, 2.0]), torch.tensor([0.5, 0.1, 3.0])
    init = torch.tensor([0.0, 0.05, 2.5]).repeat(20, 1)
    a = pso_minimise(f, init, lo, hi, iterations=40, inertia=1.5, c1=2.0, c2=2.0, seed=3)   # wild: velocities leave the box
    b = pso_minimise(f, init, lo, hi, iterations=40, inertia=1.5, c1=2.0, c2=2.0, seed=3)
    assert a.trace == b.trace and torch.equal(a.best_pos, b.best_pos)
    pos = torch.cat(seen)
    assert bool(((pos >= lo) & (pos <= hi)).all())


def test_periodic_wraps():
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    out = periodic(torch.tensor([[1.5], [-1.25], [0.3], [5.5]]), lo, hi)
    assert torch.allclose(out.flatten(), torch.tensor([-0.5, 0.75, 0.3, -0.5]))


def test_ftol_early_stop():
    res = pso_minimise(lambda p: torch.zeros(len(p)), torch.zeros(5, 2), -torch.ones(2), torch.ones(2),
                       iterations=100, ftol_iter=10, seed=0)
    assert res.iterations == 11


@pytest.mark.parametrize("units", [
    [("relu3", 1), ("relu3", 7)],                  # post-activation Linear units -> next Linear's columns
    [("fc1", 2), ("fc1", 5)],                      # pre-activation units -> own rows and biases
    [("conv2", 3)],                                # conv output channel -> its kernel and bias
    [("relu2", 0), ("relu2", 4)],                  # conv channels through max-pool + flatten -> column blocks
    [("pool1", 2), ("relu3", 0), ("fc1", 1)],      # several layers at once
    [("flatten", 3), ("flatten", 40), ("flatten", 95)],   # flattened conv features (backdoor default) -> columns
])
def test_baked_edit_equals_scaled_activations(units):
    torch.manual_seed(0)
    model = create_model("small-cnn", (1, 16, 16), 5, channels=(4, 6), hidden=12).eval()
    x = torch.rand(16, 1, 16, 16)
    scales = torch.tensor([0.37, 2.9, 1.6])[: len(units)]
    if not any(l.startswith(("relu2", "pool")) for l, _ in units):
        scales = -scales                               # negative scales are exact away from max-pooling
    baked = bake(model, {u: float(a) for u, a in zip(units, scales)}, x)
    from netmend.edit import Edit

    edit = Edit.between(model, baked)
    fresh = copy.deepcopy(model)
    edit.apply(fresh)
    ref = ScaledModel(model, units, x).logits(scales[None])[0]
    assert (fresh(x) - ref).abs().max() < 1e-6
    hooked = ScaledModel(model, units, x, cache_prefix=False).logits(scales[None])[0]   # no prefix, no low rank
    assert (hooked - ref).abs().max() < 1e-6
    edit.revert(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_negative_scale_through_maxpool_refused():
    model = create_model("small-cnn", (1, 16, 16), 5).eval()
    with pytest.raises(NetmendError):
        bake(model, {("relu2", 0): -1.0}, torch.rand(2, 1, 16, 16))


def test_pso_repair_batched_equals_one_by_one(toy):
    model, d = toy
    sites = locate_causal(model, d, CausalConfig(samples=200, keep=4))
    cfg = dict(iterations=8, seed=1)
    a = repair_pso(model, d, sites, PSOConfig(**cfg))
    b = repair_pso(model, d, sites, PSOConfig(batched=False, **cfg))
    assert a.meta["trace"] == pytest.approx(b.meta["trace"], abs=1e-6)
    assert a.meta["iterations"] == b.meta["iterations"]
    assert len(a.meta["scales"]) == 4 and a.meta["bake_error"] < 1e-4


def test_care_preset_repairs_toy_backdoor(toy):
    model, d = toy
    before = d.metrics(model)
    res = netmend.api.repair(model, d, method="care", locate_options={"samples": 400},
                             repair_options={"alpha": 0.5}, seed=0)
    assert res.after["asr"] < 0.2 * before["asr"]
    assert res.after["clean_accuracy"] > before["clean_accuracy"] - 0.05
    assert res.edit.meta["best_cost"] <= res.edit.meta["identity_cost"]
    assert all(-10 <= s["scale"] <= 10 for s in res.edit.meta["scales"])
    assert d.metrics(model) == before                  # the input model is untouched


def test_pso_without_sites_is_user_error(toy):
    model, d = toy
    with pytest.raises(NetmendError):
        repair_pso(model, d, None, PSOConfig())


def test_scaled_model_particles_agree_across_paths():
    """P particles at once: low-rank cached path == whole-model hooked path, sites on several layers."""
    torch.manual_seed(0)
    model = create_model("mlp", [6], 3, hidden=(10, 8, 5)).eval()
    x = torch.rand(30, 6)
    units = [("relu1", 2), ("relu1", 7), ("fc2", 3), ("relu3", 1)]
    scales = torch.rand(4, len(units)) * 4 - 2
    a = ScaledModel(model, units, x).logits(scales)
    b = ScaledModel(model, units, x, cache_prefix=False).logits(scales)
    assert a.shape == (4, 30, 3) and torch.allclose(a, b, atol=1e-5)


def test_scaled_model_through_maxpool_and_dedupe():
    """Conv-channel sites before ReLU-free max-pool → flatten → Linear: the precomputed low-rank path equals the
    hooked whole-model path for scales ≥ 0, falls back for negative ones; repeated rows are gathered back."""
    torch.manual_seed(0)
    model = create_model("small-cnn", (1, 12, 12), 4, channels=(3, 5), hidden=7).eval()
    x = torch.rand(5, 1, 12, 12)[torch.tensor([0, 1, 1, 2, 3, 4, 0, 0])]
    units = [("relu2", 1), ("relu2", 4), ("relu3", 2)]
    sm = ScaledModel(model, units, x)
    assert sm.fast is not None and sm.needs_nonneg and sm.m == 5
    for scales in (torch.rand(3, 3) * 3, torch.rand(3, 3) * 4 - 2):
        a = sm.logits(scales)
        b = ScaledModel(model, units, x, cache_prefix=False).logits(scales)
        assert a.shape == (3, 8, 4) and torch.allclose(a, b, atol=1e-5)
