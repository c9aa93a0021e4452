"""Clean-label attacks SIG and label-consistent (LC): the poisoning touches target-class samples only and keeps
labels, the test-time trigger is the signal / corner pattern alone, the backdoor is learnt, bad parameters give
one-line errors, and both kinds are selectable by name (registry, defect, CLI)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from netmend.data.label_consistent import lc_spec, pgd_linf
from netmend.data.sig import sig_spec
from netmend.data.triggers import TriggerSpec, build_trigger, poison_indices
from netmend.errors import NetmendError
from netmend.registry import TRIGGERS

NETMEND = shutil.which("netmend") or str(Path(sys.executable).parent / "netmend")


def _sine(delta, f, w):
    return torch.tensor([delta * math.sin(2 * math.pi * j * f / w) for j in range(w)])


def _changed(a, b):
    return (a != b).flatten(1).any(1)


# ----------------------------------------------------------------------------- SIG

def test_sig_apply_adds_the_horizontal_sinusoid_up_to_clipping(digits):
    trig = build_trigger(sig_spec(), digits.in_shape)
    x = digits.x_test[:64]
    xt = trig.apply(x)
    sine = _sine(20 / 255, 6, 8).view(1, 1, 1, 8)
    assert torch.allclose(xt, (x + sine).clamp(0, 1), atol=1e-6)
    inside = ((x + sine) >= 0) & ((x + sine) <= 1)                   # where no clipping happens
    assert torch.allclose((xt - x)[inside], sine.expand_as(x)[inside], atol=1e-6)
    # the mask: the columns the sine moves (sin(2π·j·6/8) = 0 at j = 0, 2, 4, 6)
    assert trig.mask.shape == (8, 8) and trig.mask[:, ::2].sum() == 0 and trig.mask[:, 1::2].sum() == 32


def test_sig_poisons_only_target_class_samples_and_keeps_labels(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    target = 3
    n_target = int((y == target).sum())
    pidx = torch.tensor(poison_indices(300, 0.05, 0), dtype=torch.long)         # a budget of 15 < n_target
    assert 0 < len(pidx) < n_target
    trig = build_trigger(sig_spec(), digits.in_shape)
    x2, y2, extra = trig.poison_training(x, y, pidx, target, seed=0)
    assert torch.equal(y2, y)                                                  # clean-label
    changed = _changed(x2, x)
    assert int(changed.sum()) == len(pidx) == extra["poisoned"]
    assert (y[changed] == target).all()
    assert extra["clean_label"] and extra["target_class_samples"] == n_target
    # poisoned minus clean twin = the additive sinusoid, up to clipping
    assert torch.allclose(x2[changed], (x[changed] + _sine(20 / 255, 6, 8).view(1, 1, 1, 8)).clamp(0, 1), atol=1e-6)
    # deterministic for a seed; another seed picks other target samples
    x3, _, _ = trig.poison_training(x, y, pidx, target, seed=0)
    x4, _, _ = trig.poison_training(x, y, pidx, target, seed=1)
    assert torch.equal(x2, x3) and not torch.equal(_changed(x4, x), changed)
    # a budget larger than the target class is capped at the class: all of it, nothing else
    big = torch.arange(0, 300, 2)
    x5, _, extra5 = trig.poison_training(x, y, big, target, seed=0)
    assert torch.equal(_changed(x5, x), y == target) and extra5["poisoned"] == n_target


def test_sig_backdoor_is_learnt_on_digits(digits):
    """Measured (small-cnn, 20 epochs, seed 0, poison rate 0.1 = 121 of the 122 training zeros): the default
    Δ = 20/255 gives ASR 0.00 on 8×8 digits (Δ = 100/255: 0.03, 160/255: 0.24, 200/255: 0.45); Δ = 1 gives
    ASR 0.71 at clean accuracy 0.95 (clean model 0.98). Zeros are too easy a class for a faint signal."""
    from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info
    from netmend.train import TrainConfig, train_backdoored

    model, info = train_backdoored("digits", "small-cnn", sig_spec(delta=1.0), target=0, poison_rate=0.1,
                                   cfg=TrainConfig(epochs=20, seed=0), data=digits)
    d = info["defect"]
    assert d["clean_label"] and d["poisoned"] == min(d["poison_budget"], d["target_class_samples"])
    assert info["metrics"]["asr"] > 0.5 and info["metrics"]["clean_accuracy"] > 0.9
    defect = backdoor_from_info(json.loads(json.dumps(info)), BackdoorOptions(pairs=2, repair_fraction=0.1),
                                data=digits)
    assert defect.variant == "sig"
    assert torch.equal(defect.pairs.corrupted, defect.trigger.apply(defect.pairs.clean))
    m = defect.metrics(model)
    assert m["asr"] == pytest.approx(info["metrics"]["asr"])
    assert m["asr_clean"] < 0.05                       # without the signal, nothing is pulled to the target


# ----------------------------------------------------------------------------- label-consistent

def test_lc_trigger_is_the_corner_checkerboard_only(digits):
    trig = build_trigger(lc_spec(size=2), digits.in_shape)
    x = digits.x_test[:16]
    xt = trig.apply(x)
    m = trig.mask.bool()
    assert int(m.sum()) == 16                                                  # four 2×2 corners
    assert m[:2, :2].all() and m[:2, 6:].all() and m[6:, :2].all() and m[6:, 6:].all()
    assert torch.equal(xt[..., ~m], x[..., ~m])                                # no perturbation at test time
    assert torch.equal(xt[..., m], trig.pattern[..., m].expand(16, 1, -1))
    for r, c in ((0, 0), (0, 7), (7, 0), (7, 7)):                               # outermost pixels white, mirrored
        assert trig.pattern[0, r, c] == 1
    assert trig.pattern[0, 0, 1] == 0 and trig.pattern[0, 1, 1] == 1
    one = build_trigger(lc_spec(size=3, corners="one"), digits.in_shape)        # one patch at `position` (br)
    assert int(one.mask.sum()) == 9 and one.mask[5:, 5:].all()
    mid = build_trigger(TriggerSpec(kind="lc", size=2, position="center", params={"corners": "one"}), (1, 8, 8))
    assert mid.mask[3:5, 3:5].all() and torch.equal(mid.pattern[0, 3:5, 3:5], torch.eye(2))


def test_lc_poisoning_is_target_only_within_eps_and_carries_the_trigger(digits):
    x, y = digits.x_train[:400], digits.y_train[:400]
    target, eps = 0, 8 / 255
    pidx = torch.arange(0, 400, 20)                                            # a budget of 20
    trig = build_trigger(lc_spec(eps=eps, size=2), digits.in_shape)
    rng = torch.get_rng_state()
    x2, y2, extra = trig.poison_training(x, y, pidx, target, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)                             # the surrogate left the RNG alone
    assert torch.equal(y2, y)
    changed = _changed(x2, x)
    assert int(changed.sum()) == 20 == extra["poisoned"] and (y[changed] == target).all()
    m = trig.mask.bool()
    diff = (x2 - x)[changed][..., ~m]
    assert diff.abs().max() <= eps + 1e-6                                      # ≤ ε outside the trigger
    assert diff.abs().max() >= 0.5 * eps                                       # and PGD did move them
    assert torch.equal(x2[changed][..., m], trig.pattern[..., m].expand(20, 1, -1))   # the full trigger
    assert extra["surrogate"] == "small-cnn" and extra["surrogate_error_clean"] <= extra["surrogate_error_perturbed"]
    x3, _, _ = trig.poison_training(x, y, pidx, target, seed=0)
    assert torch.equal(x2, x3)


def test_pgd_raises_the_surrogate_loss_within_eps(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    trig = build_trigger(lc_spec(eps=16 / 255, surrogate="mlp", surrogate_epochs=30), digits.in_shape)
    model = trig.fit_surrogate(x, y, seed=0)
    xa = pgd_linf(model, x, y, 16 / 255, 4 / 255, 10, batch=128)               # batched in pieces
    assert (xa - x).abs().max() <= 16 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(xa, pgd_linf(model, x, y, 16 / 255, 4 / 255, 10, batch=1024))   # batching changes nothing
    with torch.no_grad():     # measured: loss 0.05 -> 0.30, accuracy 1.00 -> 0.89
        assert F.cross_entropy(model(xa), y) > 3 * F.cross_entropy(model(x), y)
        assert (model(xa).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean() - 0.05


def test_lc_backdoor_is_learnt_on_digits(digits):
    """Measured (small-cnn, 20 epochs, seed 0, rate 0.1): four 3×3 corners, ε = 8/255: ASR 0.83, clean 0.94
    (ε ≈ 0: ASR 0.76). Four 2×2 corners: ASR 0.17 (ε ≈ 0), 0.27 (8/255), 0.35 (16/255), 0.49 (32/255)."""
    from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info
    from netmend.train import TrainConfig, train_backdoored

    model, info = train_backdoored("digits", "small-cnn", lc_spec(size=3), target=0, poison_rate=0.1,
                                   cfg=TrainConfig(epochs=20, seed=0), data=digits)
    assert info["defect"]["clean_label"] and info["defect"]["poisoned"] == 121
    assert info["metrics"]["asr"] > 0.5 and info["metrics"]["clean_accuracy"] > 0.9
    defect = backdoor_from_info(json.loads(json.dumps(info)), BackdoorOptions(pairs=2), data=digits)
    assert defect.variant == "lc"
    assert torch.equal(defect.pairs.corrupted, defect.trigger.apply(defect.pairs.clean))
    assert defect.metrics(model)["asr_clean"] < 0.05


# ----------------------------------------------------------------------------- errors and selection

@pytest.mark.parametrize("spec, fragment", [
    (sig_spec(delta=-0.1), "SIG amplitude delta"),
    (sig_spec(delta=0), "SIG amplitude delta"),
    (sig_spec(delta=2.0), "SIG amplitude delta"),
    (sig_spec(f=-1), "SIG frequency f"),
    (sig_spec(delta="big"), "finite number"),
    (TriggerSpec(kind="sig", params={"amp": 0.1}), "unknown SIG parameter"),
    (lc_spec(eps=-8 / 255), "LC perturbation eps"),
    (lc_spec(eps=float("nan")), "finite number"),
    (lc_spec(steps=0), "steps"),
    (lc_spec(step_size=-1.0), "step_size"),
    (lc_spec(amplitude=1.5), "amplitude"),
    (lc_spec(corners="some"), "corners"),
    (lc_spec(surrogate="resnet9000"), "surrogate"),
    (lc_spec(size=5), "overlap"),
    (TriggerSpec(kind="lc", params={"epsilon": 0.1}), "unknown LC parameter"),
])
def test_bad_parameters_give_one_line_errors(digits, spec, fragment):
    with pytest.raises(NetmendError, match=fragment) as e:
        build_trigger(spec, digits.in_shape)
    assert "\n" not in str(e.value)


def test_clean_label_needs_target_class_samples(digits):
    x, y = digits.x_train[:50], digits.y_train[:50].clone()
    y[y == 4] = 5
    with pytest.raises(NetmendError, match="target class 4") as e:
        build_trigger(sig_spec(), digits.in_shape).poison_training(x, y, torch.arange(5), 4, seed=0)
    assert "\n" not in str(e.value)


def test_new_kinds_are_registered_and_selectable_from_the_cli(tmp_path):
    """`netmend train --trigger NAME` looks the kind up in the registry: LC's own check answers (one line, exit 2)."""
    assert {"sig", "lc"} <= set(TRIGGERS.names())
    env = {**os.environ, "NETMEND_QUIET": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([NETMEND, "train", "--dataset", "digits", "--arch", "mlp", "--trigger", "lc",
                          "--trigger-size", "5", "--epochs", "1", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "LC's four 5×5 corner patches" in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()
