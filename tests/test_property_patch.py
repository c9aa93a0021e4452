"""property-patch: safe by construction (the verifier proves it), unchanged outside the box, every original weight
kept, and the structural edit applies, reverts, saves and reloads like any other."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netmend import api
from netmend.data.vnnlib import Property
from netmend.defects.safety import SafetyDefect, SafetyOptions
from netmend.edit import Edit
from netmend.errors import NetmendError
from netmend.verify import verify
from netmend.zoo.acasxu import acasxu

SMALL = dict(counterexamples=64, satisfying=200, heldout_counterexamples=64, falsify_starts=256, falsify_steps=20,
             eval_samples=20000, eval_falsify_starts=128, fidelity_samples=5000)
BOX = (torch.tensor([0.1, -0.3, 0.0]), torch.tensor([0.4, 0.1, 0.2]))


def _net(seed: int, hidden=(16, 16)) -> nn.Sequential:
    """A random 3-16-16-3 chain whose output 0 is the smallest almost everywhere (so "y0 is the argmin" is violated)."""
    torch.manual_seed(seed)
    net = acasxu([3], 3, hidden=list(hidden))
    with torch.no_grad():
        getattr(net, f"fc{len(hidden) + 1}").bias[0] -= 2.0
    return net.eval()


def _property(two_disjuncts: bool = False, boxes=(BOX,)) -> Property:
    """Unsafe iff y0 is the argmin (y0 − y1 ≤ 0 and y0 − y2 ≤ 0); optionally also iff y1 ≤ y0 − 1."""
    unsafe = [(torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]), torch.zeros(2))]
    if two_disjuncts:
        unsafe.append((torch.tensor([[-1.0, 1.0, 0.0]]), torch.tensor([1.0])))
    return Property("y0-argmin", list(boxes), unsafe, 3, 3)


def _outside(defect: SafetyDefect, n: int, gap: float) -> torch.Tensor:
    """n domain points farther than `gap` (every coordinate) from each box."""
    lo, hi = defect.domain()
    g = torch.Generator().manual_seed(5)
    x = lo + torch.rand(4 * n, len(lo), generator=g) * (hi - lo)
    near = torch.zeros(len(x), dtype=torch.bool)
    for blo, bhi in defect.prop.boxes:
        near |= ((x >= blo - gap) & (x <= bhi + gap)).all(-1)
    return x[~near][:n]


@pytest.mark.parametrize("seed,two,boxes,hidden", [(0, False, (BOX,), (16, 16)), (1, True, (BOX,), (16, 16)),
                                                   (2, False, (BOX, (BOX[0] - 0.5, BOX[1] - 0.45)), (16, 16)),
                                                   (3, True, (BOX, (BOX[0] - 0.5, BOX[1] - 0.45)), (24,)),
                                                   (4, False, (BOX,), (12, 12, 12, 12))])
def test_patch_is_verified_and_changes_nothing_past_the_band(seed, two, boxes, hidden):
    net = _net(seed, hidden)
    prop = _property(two, boxes)
    assert verify(net, prop, timeout=20).status == "violated"
    defect = SafetyDefect(net, prop, SafetyOptions(**SMALL, seed=seed))
    res = api.repair(net, defect, method="property-patch", seed=seed)
    assert res.accepted, res.gate
    patched = res.model
    assert verify(patched, prop, timeout=20).status == "verified"
    x_box = prop.sample(20000, torch.Generator().manual_seed(9))
    assert not bool(prop.violated(patched(x_box)).any())
    x = _outside(defect, 20000, gap=2e-4)
    with torch.no_grad():
        y0, y1 = net(x), patched(x)
    assert torch.allclose(y0, y1, atol=1e-5, rtol=0)
    assert torch.equal(y0.argmin(1), y1.argmin(1))
    assert res.after["fidelity"] == 1.0 and res.after["violation_rate"] == 0
    # every original weight is inside the new chain, unchanged; the chain is one layer deeper
    old = [m for m in net if isinstance(m, nn.Linear)]
    new = [m for m in patched if isinstance(m, nn.Linear)]
    assert len(new) == len(old) + 1
    for a, b in zip(old[:-1], new[:-2]):
        assert torch.equal(b.weight[:a.out_features, :a.in_features], a.weight)
        assert torch.equal(b.bias[:a.out_features], a.bias)
    assert torch.equal(new[-1].weight[:, :old[-1].in_features], old[-1].weight)
    assert res.edit.num_changed() == res.edit.meta["added_parameters"] > 0


def test_structural_edit_applies_reverts_saves_and_reloads(tmp_path):
    from netmend.modelio import load_model_folder
    from netmend.report.record import write_run

    net = _net(0)
    prop = _property()
    defect = SafetyDefect(net, prop, SafetyOptions(**SMALL))
    res = api.repair(net, defect, method="property-patch")
    x = torch.rand(512, 3) - 0.5
    with torch.no_grad():
        want, before = res.model(x), net(x)
    work = copy.deepcopy(net)
    modules = list(work.children())
    res.edit.apply(work)
    assert torch.equal(work(x), want)
    res.edit.revert(work)
    assert list(work.children()) == modules and torch.equal(work(x), before)     # the very same modules back
    res.edit.save(tmp_path / "edit.safetensors")
    loaded = Edit.load(tmp_path / "edit.safetensors")
    assert loaded.deltas == {} and len(loaded.layers) == len(res.edit.layers)
    assert torch.equal(loaded.apply(copy.deepcopy(net))(x), want)
    from safetensors.torch import save_file

    broken = {"chain:0.weight": res.edit.layers[0][0], "chain:1.bias": res.edit.layers[1][1]}   # halves of two layers
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(NetmendError, match="chain layers are incomplete"):
        Edit.load(tmp_path / "broken.safetensors")
    info = {"arch": "acasxu", "arch_args": {"in_shape": [3], "num_classes": 3, "hidden": [16, 16]},
            "defect": {"kind": "safety"}}
    write_run(tmp_path / "run", info, res, defect=defect)
    reloaded, rinfo = load_model_folder(tmp_path / "run")
    assert rinfo["arch_args"]["hidden"] == res.edit.meta["hidden"]
    assert torch.equal(reloaded(x), want)
    # the record says what changed: no weight, parameters added (not "nothing changed")
    import json

    st = json.loads((tmp_path / "run" / "metrics.json").read_text())["structure"]
    assert st["hidden_before"] == [16, 16] and st["hidden_after"] == res.edit.meta["hidden"]
    assert st["added_parameters"] == res.edit.meta["added_parameters"] and st["original_weights_changed"] == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "changed the network&#x27;s structure" in page or "changed the network's structure" in page
    assert "nothing changed" not in page


def test_revert_of_an_edit_never_applied_is_refused():
    net = _net(0)
    res = api.repair(net, SafetyDefect(net, _property(), SafetyOptions(**SMALL)), method="property-patch")
    with pytest.raises(NetmendError, match="only be reverted on the model it was applied to"):
        res.edit.revert(copy.deepcopy(net))


def test_a_structural_edit_is_not_merged_into_another():
    """Summing edits is for weight deltas; a patch's new layers would be lost in a sum, so it is refused."""
    from netmend.edit import Edit

    net = _net(0)
    res = api.repair(net, SafetyDefect(net, _property(), SafetyOptions(**SMALL)), method="property-patch")
    weights = Edit({"0.bias": torch.zeros(16)}, {})
    for a, b in ((res.edit, weights), (weights, res.edit)):
        with pytest.raises(NetmendError, match="structural edit"):
            a.merge(b)


def test_a_model_that_is_not_a_relu_chain_is_refused_in_one_line():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[-1].bias[0] -= 2.0
    defect = SafetyDefect(net, _property(), SafetyOptions(**SMALL))
    with pytest.raises(NetmendError, match="property-patch needs an nn.Sequential of Linear and ReLU"):
        api.repair(net, defect, method="property-patch")


def test_rows_are_chosen_independent_and_a_property_no_patch_can_meet_is_refused():
    """Disjuncts {y0 ≤ y1, y0 ≤ y2} and {y1 ≤ y0 − 1}: the cheapest rows could be opposite (y0 − y1, y1 − y0);
    the choice must pair y0 − y2 with the second. {y0 ≤ y1} and {y1 ≤ y0} together cover every output: refused."""
    from netmend.repair.property_patch import _choose_rows
    from netmend.verify import relu_chain

    net = _net(3)
    rows = _choose_rows(relu_chain(net), _property(True), torch.rand(256, 3) * 0.3 + BOX[0], 1e-3)
    c = torch.stack([r[0] for r in rows])
    assert int(torch.linalg.matrix_rank(c)) == 2
    both = Property("both", [BOX], [(torch.tensor([[1.0, -1.0, 0.0]]), torch.zeros(1)),
                                    (torch.tensor([[-1.0, 1.0, 0.0]]), torch.zeros(1))], 3, 3)
    defect = SafetyDefect(net, both, SafetyOptions(**SMALL))
    with pytest.raises(NetmendError, match="no choice of one row per unsafe disjunct is linearly independent") as exc:
        api.repair(net, defect, method="property-patch")
    assert "\n" not in str(exc.value)


def test_a_wide_input_keeps_the_domain_bound_small():
    """40 inputs: 4⁴⁰ sub-boxes would never finish; the bound splits the widest few dimensions only."""
    torch.manual_seed(0)
    net = acasxu([40], 3, hidden=[16, 16])
    with torch.no_grad():
        net.fc3.bias[0] -= 2.0
    box = (torch.full((40,), 0.1), torch.full((40,), 0.2))
    defect = SafetyDefect(net.eval(), Property("wide", [box], _property().unsafe, 40, 3), SafetyOptions(**SMALL))
    res = api.repair(net, defect, method="property-patch")
    assert res.accepted and verify(res.model, defect.prop, timeout=30).status == "verified"


@pytest.mark.parametrize("option", ["margin=0", "band=-1e-4", "slack=0", "grid=0"])
def test_a_bad_option_is_one_line(option):
    net = _net(0)
    key, value = option.split("=")
    with pytest.raises(NetmendError, match="property_patch: .* must be") as exc:
        api.repair(net, SafetyDefect(net, _property(), SafetyOptions(**SMALL)), method="property-patch",
                   repair_options={key: float(value) if key != "grid" else int(value)})
    assert "\n" not in str(exc.value)
