"""VNN-LIB properties and the safety (ACAS Xu) defect: parsing, batched violation checks, falsifier, metrics."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from netmend.data.vnnlib import load_vnnlib, parse_vnnlib
from netmend.defects.safety import SafetyDefect, SafetyOptions, advisory, falsify, resolve_property, safety_from_info
from netmend.errors import NetmendError
from netmend.zoo.acasxu import acasxu, load_nnet

ACAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "acasxu"
needs_acas = pytest.mark.skipif(not (ACAS / "vnnlib").is_dir(), reason="ACAS Xu files not found under ../shared/data/acasxu")

TOY = """; toy: unsafe iff output 0 is the argmin
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (<= X_0 1.0))
(assert (>= X_0 -1.0))
(assert (and (<= X_1 1) (>= X_1 -1)))
(assert (<= Y_0 Y_1))
"""


def toy_net(threshold: float = -0.8):
    """y0 = x0, y1 = threshold: violates TOY exactly where x0 ≤ threshold (10% of the box for −0.8)."""
    net = acasxu([2], 2, hidden=[])
    with torch.no_grad():
        net.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net.fc1.bias.copy_(torch.tensor([0.0, threshold]))
    return net.eval()


def hidden_toy_net():
    """toy_net(−0.8) through a hidden ReLU layer of 8 (5 of them idle): something for gradient repairs to tune."""
    net = acasxu([2], 2, hidden=[8])
    with torch.no_grad():                                # a hidden layer that passes x0 and the threshold through
        net.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]] + [[0.0, 0.0]] * 6))
        net.fc1.bias.copy_(torch.tensor([0.0, 0.0, 1.0] + [0.0] * 5))
        net.fc2.weight.copy_(torch.tensor([[1.0, -1.0, 0.0] + [0.0] * 5, [0.0, 0.0, -0.8] + [0.0] * 5]))
        net.fc2.bias.zero_()
    return net.eval()


SMALL = dict(counterexamples=64, satisfying=200, heldout_counterexamples=64, falsify_starts=256, falsify_steps=20,
             eval_samples=20000, eval_falsify_starts=128, fidelity_samples=5000)


def test_parse_and_batched_violation():
    p = parse_vnnlib(TOY, "toy")
    assert p.n_inputs == 2 and p.n_outputs == 2 and len(p.boxes) == 1
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert p.violated(y).tolist() == [True, False, True]           # ties count as unsafe
    assert ((p.margin(y) >= 0) == p.violated(y)).all()
    yb = torch.randn(3, 7, 2)
    assert p.violated(yb).shape == (3, 7) and ((p.margin(yb) >= 0) == p.violated(yb)).all()
    assert p.in_box(torch.tensor([[0.0, 0.0], [2.0, 0.0]])).tolist() == [True, False]


def test_linear_terms_and_disjunction():
    text = TOY.replace("(assert (<= Y_0 Y_1))", "(assert (or (and (>= (+ Y_0 (* 2 Y_1)) 3)) (and (<= (- Y_0) -5))))")
    p = parse_vnnlib(text, "lin")
    y = torch.tensor([[1.0, 1.0], [5.0, -10.0], [0.0, 0.0]])
    assert p.violated(y).tolist() == [True, True, False]


@pytest.mark.parametrize("text, match", [
    (TOY + "(assert (<= Y_0 Y_1)", "unbalanced '\\('"),
    (TOY + ")", "unbalanced '\\)'"),
    (TOY.replace("(<= Y_0 Y_1)", "(xor Y_0 Y_1)"), "unsupported connective 'xor'"),
    (TOY.replace("(<= X_0 1.0)", "(<= X_0 -2.0)"), "empty input box: X_0"),
    (TOY.replace("(assert (<= X_0 1.0))", ""), "X_0 has no lower or upper bound"),
    (TOY.replace("(<= Y_0 Y_1)", "(<= X_0 Y_1)"), "mixes inputs and outputs"),
    (TOY.replace("(<= Y_0 Y_1)", "(<= Y_0 Y_7)"), "Y_7 is used but not declared"),
    (TOY.replace("(<= Y_0 Y_1)", "(<= (* Y_0 Y_1) 1)"), "not linear"),
])
def test_malformed_vnnlib_one_line_error(text, match):
    with pytest.raises(NetmendError, match=match) as exc:
        parse_vnnlib(text, "bad")
    assert "\n" not in str(exc.value)


def test_property_names_and_variants(tmp_path):
    p = resolve_property("phi2-strengthened")
    y = torch.tensor([[0.0, 1, 1, 1, 1], [1.0, 1, 0, 1, 1]])
    assert p.violated(y).tolist() == [False, True]
    assert resolve_property("phi2-strengthened", "care").boxes[0][0].tolist() == p.boxes[0][0].tolist()
    with pytest.raises(NetmendError, match="unknown property"):
        resolve_property("no such thing!")
    with pytest.raises(NetmendError, match="needs a property"):
        resolve_property("")
    f = tmp_path / "toy.vnnlib"
    f.write_text(TOY)
    with pytest.raises(NetmendError, match="no CARE box"):
        resolve_property(str(f), "care")
    with pytest.raises(NetmendError, match="not found"):
        load_vnnlib(tmp_path / "missing.vnnlib")


def test_falsifier_finds_only_counterexamples():
    p, net = parse_vnnlib(TOY, "toy"), toy_net(-0.95)     # 2.5% of the box violates
    r = falsify(net, p, seed=0, starts=64, steps=20, want=100)
    assert r.starts_hit > 10 and len(r.counterexamples) == 100
    assert p.violated(net(r.counterexamples)).all() and p.in_box(r.counterexamples).all()
    r2 = falsify(net, p, seed=0, starts=64, steps=20, want=100)
    assert torch.equal(r.counterexamples, r2.counterexamples)          # seeded


def test_defect_objective_and_metrics():
    p, net = parse_vnnlib(TOY, "toy"), toy_net(-0.8)
    d = SafetyDefect(net, p, SafetyOptions(**SMALL))
    x_bad, y_bad = d.evidence()
    assert len(x_bad) == 64 and p.violated(net(x_bad)).all() and (y_bad == 1).all()   # the allowed advisory
    assert not torch.equal(x_bad[:10], d.x_heldout[:10])
    assert not p.violated(net(d.repair.x_fit)).any() and len(d.repair) == 200
    assert torch.equal(d.repair.y_fit, advisory(net(d.repair.x_fit)))
    obj = d.objective(net)
    logits = torch.stack([net(obj.x_bad), net(obj.x_bad) * 0 + torch.tensor([1.0, 0.0])])   # (P=2, N, K)
    assert obj.violated(logits).shape == (2, 51) and obj.violated(logits)[0].all() and not obj.violated(logits)[1].any()
    assert torch.equal(obj.decide(net(obj.x_good)), obj.y_good)
    assert len(obj.x_good) == len(d.repair.x_fit) + d.options.outside and not p.in_box(obj.x_good[-100:]).any()
    vobj = d.validation_objective(net)                   # the 13 held-apart counterexamples, val + fresh outside
    assert len(vobj.x_bad) == 13 and len(vobj.x_good) == len(d.repair.x_val) + d.options.outside // 2
    care_obj = SafetyDefect(net, p, SafetyOptions(**SMALL, outside=0)).objective(net)   # CARE's objective
    assert len(care_obj.x_bad) == 64 and torch.equal(care_obj.x_good, d.repair.x_fit)
    assert float(obj.cost(net(obj.x_bad), net(obj.x_good), 0.3)) == pytest.approx(0.7)
    x = x_bad[:5].clone().requires_grad_(True)
    v = d.violation(net, x, y_bad[:5])
    v.sum().backward()
    assert (v >= 0).all() and x.grad is not None
    m = d.metrics(net)
    assert m["violation_samples"] == 20000 and m["violation_rate_ci"][0] <= 0.1 <= m["violation_rate_ci"][1]
    assert m["heldout_violation_rate"] == 1.0 and m["fidelity"] == 1.0 and m["counterexamples_found"] > 0
    assert m["fidelity_region"] == "outside-box" and d.validation_score(net) == 1.0
    fixed = toy_net(-2.0)                                # never violates inside the box
    m2 = d.metrics(fixed)
    assert m2["violation_rate"] == 0 and m2["heldout_violation_rate"] == 0 and m2["counterexamples_found"] == 0
    assert m2["fidelity"] < 1.0                          # the change shows outside the box


def test_no_counterexample_is_a_clear_error():
    p = parse_vnnlib(TOY, "toy")
    d = SafetyDefect(toy_net(-2.0), p, SafetyOptions(**SMALL))
    with pytest.raises(NetmendError, match="no counterexample"):
        d.objective(toy_net(-2.0))


@needs_acas
def test_all_ten_acas_properties_parse():
    shapes = {}
    for i in range(1, 11):
        p = load_vnnlib(ACAS / "vnnlib" / f"prop_{i}.vnnlib")
        assert p.n_inputs == 5 and p.n_outputs == 5
        shapes[i] = (len(p.boxes), len(p.unsafe))
    assert shapes[1] == (1, 1) and shapes[2] == (1, 1) and shapes[6] == (2, 4) and shapes[7] == (1, 2) and shapes[8] == (1, 3)
    p8 = resolve_property(str(ACAS / "vnnlib" / "prop_8.vnnlib"))
    p8c = resolve_property(str(ACAS / "vnnlib" / "prop_8.vnnlib"), "care")
    w = lambda p: float(p.boxes[0][1][2] - p.boxes[0][0][2])  # noqa: E731
    assert w(p8c) == pytest.approx(2 * w(p8), rel=1e-3)


@needs_acas
def test_acas_n33_strengthened_phi2_rate_and_falsifier():
    model, info = load_nnet(ACAS / "nnet" / "ACASXU_run2a_3_3_batch_2000.nnet")
    opts = SafetyOptions(property="phi2-strengthened", **{**SMALL, "eval_samples": 200000})
    d = safety_from_info(info, opts, model=model)
    m = d.metrics(model)
    assert 0.055 < m["violation_rate"] < 0.065          # METHODS.md §8.4: 6.0%
    assert m["counterexamples_found"] > 10 and m["heldout_violation_rate"] == 1.0 and m["fidelity"] == 1.0
    assert (d.y_bad == 0).all()                         # the allowed advisory is COC


@needs_acas
def test_acas_n29_phi8_falsifier_finds_counterexamples():
    model, _ = load_nnet(ACAS / "nnet" / "ACASXU_run2a_2_9_batch_2000.nnet")
    p = resolve_property(str(ACAS / "vnnlib" / "prop_8.vnnlib"))
    r = falsify(model, p, seed=0, starts=2048, steps=50, step=0.03, want=200)
    assert r.starts_hit >= 3 and len(r.counterexamples) == 200
    assert p.violated(model(r.counterexamples)).all()


@needs_acas
@pytest.mark.slow
def test_acas_n29_phi8_rate_1e6():
    model, info = load_nnet(ACAS / "nnet" / "ACASXU_run2a_2_9_batch_2000.nnet")
    d = safety_from_info(info, SafetyOptions(property=str(ACAS / "vnnlib" / "prop_8.vnnlib")), model=model)
    m = d.metrics(model)
    assert 2.5e-4 < m["violation_rate"] < 4.5e-4 and m["violation_samples"] == 1_000_000   # §8.4: 3.4e-4


def test_more_evidence_rounds_and_margin():
    p, net = parse_vnnlib(TOY, "toy"), toy_net(-0.8)
    d = SafetyDefect(net, p, SafetyOptions(**SMALL, round_counterexamples=40, round_uniform=5000))
    n_fit, n_val = len(d.objective(net).x_bad), len(d.validation_objective(net).x_bad)
    assert d.more_evidence(toy_net(-2.0), 0) == 0 and d.x_rounds == []     # a candidate the search cannot break
    added = d.more_evidence(toy_net(-0.9), 0)                              # still violates where x0 ≤ −0.9
    assert added > 0 and p.violated(toy_net(-0.9)(d.x_rounds[0])).all()
    assert len(d.objective(net).x_bad) + len(d.validation_objective(net).x_bad) == n_fit + n_val + added
    assert len(d.validation_objective(net).x_bad) > n_val                  # rounds are split fit / validation too
    d.clear_rounds()
    assert len(d.objective(net).x_bad) == n_fit
    # decision margin: a counterexample repaired only onto the boundary still counts as violated
    obj = d.objective(net)
    near = torch.tensor([[0.0, 0.0005], [0.0, -0.0005], [0.0, -0.01]])       # margins 0.0005, −0.0005, −0.01
    assert obj.violated(near).tolist() == [True, True, False]
    plain = SafetyDefect(net, p, SafetyOptions(**SMALL, objective_margin=0.0)).objective(net)
    assert plain.violated(near).tolist() == [True, False, False]


def test_care_rounds_on_toy():
    import netmend

    p, net = parse_vnnlib(TOY, "toy"), toy_net(-0.8)
    d = SafetyDefect(net, p, SafetyOptions(**SMALL, round_uniform=5000))
    res = netmend.api.repair(net, d, method="care", locate_options={"keep": 2}, repair_options={"rounds": 2})
    rounds = res.edit.meta["rounds"]
    assert 1 <= len(rounds) <= 3 and all("found" in r for r in rounds[:-1])
    assert res.after["violation_rate"] <= res.before["violation_rate"]
    res0 = netmend.api.repair(net, d, method="care", locate_options={"keep": 2}, repair_options={"rounds": 0})
    assert len(res0.edit.meta["rounds"]) == 1


def test_finetune_follows_the_argmin_advisory_and_argmax_methods_refuse():
    """ACAS networks decide by the LOWEST output: fine-tuning must push the advisory's score down, not up
    (cross-entropy on the raw outputs turned every advisory around), and methods that read argmax say so."""
    import netmend
    from netmend.registry import METHODS

    p, net = parse_vnnlib(TOY, "toy"), hidden_toy_net()
    d = SafetyDefect(net, p, SafetyOptions(**SMALL))
    assert d.metrics(net)["violation_rate"] > 0.05
    x, y = d.tuning_set()
    assert (y[-len(d.objective(net).x_bad):] == 1).all()     # counterexamples labelled with the allowed advisory
    # the method's behaviour, not the gate's (a toy box: 8 % left, so the gate would reject it): gate off
    r = netmend.api.repair(net, d, method="finetune", repair_options={"epochs": 30, "lr": 0.05}, gate=False)
    assert r.after["violation_rate"] < r.before["violation_rate"]
    assert d.validation_score(r.model) > 0.9      # advisories on the satisfying samples kept (the sign bug: ~0)
    for method in ("inner", "fine-pruning"):
        assert method in METHODS
        with pytest.raises(NetmendError, match="argmin"):
            netmend.api.repair(net, d, method=method)
    for method in ("rectify", "rectify-static", "p-clarc"):      # no pairs here, and no --pairs to ask for
        with pytest.raises(NetmendError, match="has none"):
            netmend.api.repair(net, d, method=method)


def test_property_tune_removes_violations_keeps_advisories_and_refuses_other_defects():
    """Fresh box samples must end safe by the margin, fresh outside samples keep the original advisory; the edit
    is an ordinary weight delta; a defect without a property to sample gets a one-line error."""
    from types import SimpleNamespace

    import netmend
    from netmend.repair.property_tune import PropertyTuneConfig, property_tune

    p, net = parse_vnnlib(TOY, "toy"), hidden_toy_net()
    d = SafetyDefect(net, p, SafetyOptions(**SMALL))
    before = d.metrics(net)
    assert before["violation_rate"] > 0.05
    r = netmend.api.repair(net, d, method="property-tune",
                           repair_options={"steps": 300, "box_batch": 512, "keep_batch": 1024, "lr": 0.01},
                           gate=False)   # the method's behaviour (the toy costs 4 points of fidelity: the gate rejects)
    assert r.after["violation_rate"] == 0 and r.after["counterexamples_found"] == 0
    assert r.after["fidelity"] > 0.9
    assert set(r.edit.deltas) <= {n for n, _ in net.named_parameters()} and r.edit.meta["repairer"] == "property_tune"
    with pytest.raises(NetmendError, match="use finetune"):
        property_tune(net, SimpleNamespace(kind="backdoor"), None, PropertyTuneConfig())
    for bad in ({"steps": 0}, {"keep_batch": 0}, {"lr": 0.0}):
        with pytest.raises(NetmendError, match="property_tune"):
            property_tune(net, d, None, PropertyTuneConfig(**bad))
    # sites restrict it: two neurons of fc1 → only their rows of fc1 (and biases) move
    from netmend.sites import Site, Sites
    sites = Sites([Site("fc1", "neuron", index=0), Site("fc1", "neuron", index=2)], "test")
    e = property_tune(net, d, sites, PropertyTuneConfig(steps=20, box_batch=256, keep_batch=256))
    assert set(e.deltas) <= {"fc1.weight", "fc1.bias"} and e.deltas
    moved = (e.deltas["fc1.weight"] != 0).any(1) if "fc1.weight" in e.deltas else torch.zeros(8, dtype=torch.bool)
    assert set(torch.nonzero(moved).flatten().tolist()) <= {0, 2}


def test_certified_repair_verifies_or_rejects():
    """--certify: a candidate the complete verifier proves is returned with verified=True; one it cannot prove is
    rejected like any gate rejection (the input model comes back), with the rounds and the time split recorded."""
    from netmend.certify import certified_repair

    p, net = parse_vnnlib(TOY, "toy"), hidden_toy_net()
    good = certified_repair(net, SafetyDefect(net, p, SafetyOptions(**SMALL)), rounds=1, verify_timeout=10,
                            method="property-tune", max_accuracy_drop=0.1,
                            repair_options={"steps": 300, "box_batch": 512, "keep_batch": 1024, "lr": 0.01})
    assert good.accepted and good.after["verified"] is True
    assert good.certify["rounds"][-1]["status"] == "verified" and good.certify["verify_seconds"] >= 0
    d = SafetyDefect(net, p, SafetyOptions(**SMALL))
    weak = certified_repair(net, d, rounds=1, verify_timeout=10, method="property-tune", gate=False,
                            repair_options={"steps": 1, "box_batch": 8, "keep_batch": 8, "lr": 1e-4, "bound_rounds": 0})
    assert not weak.accepted and weak.after["verified"] is False and "after 2 repair(s): the verifier says" in weak.gate["reason"]
    assert [r["status"] for r in weak.certify["rounds"]] == ["violated", "violated"]
    assert weak.certify["rounds"][0]["added"] >= 1              # the counterexample joined the evidence
    assert all(torch.equal(a, b) for a, b in zip(weak.model.state_dict().values(), net.state_dict().values()))
    with pytest.raises(NetmendError, match="safety"):
        certified_repair(net, SimpleNamespace(kind="backdoor"), method="finetune")


def test_box_cover_partitions_the_box_and_its_bounds_are_sound_and_differentiable():
    """The cells tile the property's box (volumes add up, none leaves it); each cell's value is a lower bound of
    the property value at every sampled point of that cell; it has a gradient in the weights; refine and
    presplit only add cells."""
    from netmend.verify.certified_loss import BoxCover

    p, net = parse_vnnlib(TOY, "toy"), hidden_toy_net()
    cover = BoxCover(p, 16, 64)
    assert len(cover.lo) == 16 and bool((cover.lo >= -1).all() and (cover.hi <= 1).all())
    assert abs(float((cover.hi - cover.lo).prod(-1).sum()) - 4.0) < 1e-5
    v = cover.values(net)
    g = torch.Generator().manual_seed(0)
    for i in range(len(cover.lo)):
        x = cover.lo[i] + torch.rand(500, 2, generator=g) * (cover.hi[i] - cover.lo[i])
        with torch.no_grad():
            true = -p.margin(net(x))                       # > 0 where safe: min over disjuncts of max over rows
        assert float(v[i].detach()) <= float(true.min()) + 1e-5
    v.sum().backward()
    assert net.fc2.weight.grad is not None and bool(net.fc2.weight.grad.abs().sum() > 0)
    n0 = len(cover.lo)
    cover.presplit(net, 0.001)
    assert n0 < len(cover.lo) <= 64


def test_property_tune_bound_rounds_turn_an_unproved_repair_into_a_verified_one():
    """One sampled step cannot repair the toy; the bound-guided rounds train on the cells' CROWN bounds until the
    verifier inside the repair proves the property, and an independent verifier call agrees."""
    import netmend
    from netmend.verify import verify

    p, net = parse_vnnlib(TOY, "toy"), hidden_toy_net()
    d = SafetyDefect(net, p, SafetyOptions(**SMALL))
    r = netmend.api.repair(net, d, method="property-tune", gate=False,
                           repair_options={"steps": 1, "box_batch": 64, "keep_batch": 256, "lr": 1e-3,
                                           "bound_rounds": 3, "bound_steps": 300, "bound_lr": 0.01,
                                           "bound_cells": 16, "verify_timeout": 10})
    rounds = r.edit.meta["bound_rounds"]
    assert rounds[0]["verify"] == "violated" and rounds[-1]["verify"] == "verified"
    assert verify(r.model, p, timeout=10).status == "verified"
    assert r.after["violation_rate"] == 0


@needs_acas
def test_certified_repair_takes_its_evidence_from_the_verifier_when_the_falsifier_finds_none():
    """A violation in a thin interior sliver (|x0 − 0.3| ≤ 0.005) that a one-start falsifier misses: --certify asks
    the verifier, repairs on its counterexample and proves the result; a network the verifier proves safe is
    'nothing to repair'."""
    from netmend.certify import certified_repair

    p, net = parse_vnnlib(TOY, "toy"), acasxu([2], 2, hidden=[8])
    with torch.no_grad():                                      # y0 = |x0 − 0.3|, y1 = 0.005
        net.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]] + [[0.0, 0.0]] * 6))
        net.fc1.bias.copy_(torch.tensor([-0.3, 0.3, 1.0] + [0.0] * 5))
        net.fc2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0] + [0.0] * 5, [0.0, 0.0, 0.005] + [0.0] * 5]))
        net.fc2.bias.zero_()
    net.eval()
    blind = {**SMALL, "falsify_starts": 1, "falsify_steps": 1, "counterexamples": 1}
    d = SafetyDefect(net, p, SafetyOptions(**blind))
    assert len(d.x_bad) == 0                                   # the falsifier saw nothing
    r = certified_repair(net, d, rounds=1, verify_timeout=10, method="property-tune", max_accuracy_drop=0.1,
                         repair_options={"steps": 300, "box_batch": 512, "keep_batch": 1024, "lr": 0.01})
    first = r.certify["rounds"][0]
    assert first["round"] == "input" and first["status"] == "violated" and first["added"] >= 1
    assert r.after["verified"] is True
    safe = toy_net(-2.0)
    with pytest.raises(NetmendError, match="nothing to repair.*verified"):
        certified_repair(safe, SafetyDefect(safe, p, SafetyOptions(**blind)), verify_timeout=10,
                         method="property-tune")


def test_active_mean_has_the_value_and_gradient_of_the_full_batch_mean():
    """The keep / box hinges back-propagate through the active samples only; value and gradient must be those
    of the plain mean over every sample (inactive hinges contribute exactly zero)."""
    from netmend.repair.property_tune import active_mean, decision_terms

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(2000, 5), torch.randint(0, 4, (2000,))
    terms = lambda xx, yy: decision_terms(net(xx), yy, 0.5)       # noqa: E731
    full = terms(x, y).mean()
    g_full = torch.autograd.grad(full, list(net.parameters()))
    part = active_mean(terms, x, y)
    g_part = torch.autograd.grad(part, list(net.parameters()))
    assert 0 < int((terms(x, y) > 0).sum()) < len(x)                # some active, some not
    assert torch.allclose(part, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_part, g_full))
    none = active_mean(lambda xx, yy: decision_terms(net(xx), yy, -1e6), x, y)      # nothing active
    assert float(none.detach()) == 0 and none.requires_grad


def test_a_safety_defect_built_in_python_names_a_property_that_does_not_fit_the_network():
    """The Python path gets the CLI's one-line error: the property's input or output count is not the network's."""
    import pytest
    from torch import nn

    from netmend.data.vnnlib import argmin_property
    from netmend.defects.safety import SafetyDefect
    from netmend.errors import NetmendError

    prop = argmin_property("p", [([0.0] * 5, [1.0] * 5)], [0])
    with pytest.raises(NetmendError, match="speaks of 5 inputs"):
        SafetyDefect(nn.Sequential(nn.Linear(7, 5)), prop)
    with pytest.raises(NetmendError, match="has 5 outputs, the network 3"):
        SafetyDefect(nn.Sequential(nn.Linear(5, 3)), prop)
