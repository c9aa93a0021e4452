"""Adversarial and wrong-prediction defects: attacks respect ε, metrics attack afresh, clear errors."""
import pytest
import torch

from netmend.defects.adversarial import AdversarialOptions, adversarial_from_info, build_attack
from netmend.defects.wrong_predictions import WrongPredictionsOptions, wrong_predictions_from_info
from netmend.errors import NetmendError

INFO = {"dataset": "digits", "split_seed": 0, "pool_fraction": 0.3}


@pytest.fixture(scope="module")
def mlp(digits):
    from netmend.train import TrainConfig, fit
    from netmend.zoo.models import create_model

    torch.manual_seed(0)
    m = create_model("mlp", digits.in_shape, 10, hidden=(32,))
    return fit(m, digits.x_train, digits.y_train, TrainConfig(epochs=3, seed=0))


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_attacks_stay_in_the_eps_ball_and_pixel_range(mlp, digits, name):
    x = digits.x_test[:64]
    adv = build_attack(name, 0.1, target=0, steps=5, seed=1)(mlp, x)
    assert adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_pgd_is_deterministic_and_moves_towards_the_target(mlp, digits):
    x = digits.x_test[:64]
    atk = build_attack("pgd", 0.3, target=0, steps=10, seed=2)
    a, b = atk(mlp, x), atk(mlp, x)
    assert torch.equal(a, b)
    p0 = torch.softmax(mlp(x), 1)[:, 0].mean()
    assert torch.softmax(mlp(a), 1)[:, 0].mean() > p0


def test_adversarial_defect_evidence_and_fresh_metrics(mlp, digits):
    d = adversarial_from_info(INFO, AdversarialOptions(pairs=20, eps=0.3, repair_fraction=0.05), data=digits, model=mlp)
    x, y = d.evidence()
    assert 0 < len(y) <= 20 and (y != 0).all()
    assert (mlp(x).argmax(1) == 0).all()                      # only successful attacks kept
    assert (x - d.pairs.clean).abs().max() <= 0.3 + 1e-6
    m = d.metrics(mlp)
    for k in ("clean_accuracy", "robust_accuracy", "asr", "class_fairness_gap"):
        assert 0 <= m[k] <= 1
    assert m["robust_accuracy"] + m["asr"] <= 1 + 1e-6


def test_wrong_predictions_defect(mlp, digits):
    d = wrong_predictions_from_info(INFO, WrongPredictionsOptions(repair_fraction=0.05), data=digits)
    with pytest.raises(NetmendError, match="prepare"):
        d.evidence()
    d.prepare(mlp)
    x, y = d.evidence()
    assert len(y) > 0 and (mlp(x).argmax(1) != y).all()
    m = d.metrics(mlp)
    assert m["evidence_fixed"] == 0 and m["heldout_fixed"] == 0 and m["n_heldout"] > 0
    # judged by accuracy itself: half the repair data validates, so a state that loses accuracy is seen
    assert abs(len(d.repair.y_val) - len(d.repair.y_fit)) <= 1


def test_mislabel_changes_the_asked_share_of_one_class_only_and_is_seeded():
    from netmend.defects.wrong_predictions import mislabel

    y = torch.arange(10).repeat(30)                         # 30 of each class
    out, flipped = mislabel(y, 6, 0, 0.4, seed=3)
    assert len(flipped) == 12 and (y[flipped] == 6).all() and (out[flipped] == 0).all()
    changed = (out != y).nonzero().flatten()
    assert torch.equal(changed.sort().values, flipped.sort().values)
    assert torch.equal(mislabel(y, 6, 0, 0.4, seed=3)[0], out) and not torch.equal(mislabel(y, 6, 0, 0.4, seed=4)[0], out)
    assert torch.equal(y, torch.arange(10).repeat(30))      # the input labels are left alone
    for args, msg in (((6, 0, 0.0), "fraction"), ((6, 0, 1.5), "fraction"), ((6, 6, 0.4), "itself"), ((6, 0, 0.4), "no training")):
        with pytest.raises(NetmendError, match=msg):
            mislabel(y if msg != "no training" else y[y != 6], *args, seed=0)


def test_bad_inputs_give_clear_errors(mlp, digits):
    with pytest.raises(NetmendError, match="eps"):
        build_attack("fgsm", 0.0, 0)
    with pytest.raises(NetmendError, match="unknown attack"):
        build_attack("cw", 0.1, 0)
    with pytest.raises(NetmendError, match="target"):
        adversarial_from_info(INFO, AdversarialOptions(target=12), data=digits)
    with pytest.raises(NetmendError, match="classes"):
        wrong_predictions_from_info(INFO, WrongPredictionsOptions(classes="1,x"), data=digits)
    with pytest.raises(NetmendError, match="step_size must be > 0"):
        build_attack("pgd", 0.1, 0, step_size=-0.01)
    with pytest.raises(NetmendError, match="eval_limit must be ≥ 1"):
        wrong_predictions_from_info(INFO, WrongPredictionsOptions(eval_limit=0), data=digits)


def test_masked_tune_regenerates_adversarial_evidence_against_the_model_in_repair(mlp, digits):
    import copy

    from netmend.registry import fill_defaults
    from netmend.repair.masked_tune import MaskedTuneConfig, _Tuner, masked_tune_defaults
    from netmend.sites import Site, Sites

    d = adversarial_from_info(INFO, AdversarialOptions(pairs=40, eps=0.3, repair_fraction=0.05), data=digits, model=mlp)
    work = copy.deepcopy(mlp)
    layer = [n for n, m in work.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    masks = Sites([Site(layer=layer)], localiser="test").masks(work)
    for refresh in (True, False):
        t = _Tuner(copy.deepcopy(work), d, masks, None,
                   fill_defaults(MaskedTuneConfig(refresh=refresh), masked_tune_defaults, d))   # as masked_tune does
        first = t.dd.x_fit.clone()
        with torch.no_grad():                                                         # the repair moves a weight
            t.weights[layer].mul_(0.5)
        t.refresh("fit")
        t.refresh("val")
        if refresh:
            assert torch.equal(t.dd.x_fit, d.attack(t.model, t.dd.c_fit))            # attacked afresh
            assert torch.equal(t.dd.x_val, d.attack(t.model, t.dd.c_val))
            assert not torch.equal(t.dd.x_fit, first)
        else:
            assert torch.equal(t.dd.x_fit, first)                                     # the fixed evidence


def test_adversarial_repair_measures_misclassification_with_a_two_point_budget(mlp, digits):
    """The metric is robust accuracy, so the tuner's violation on adversarial evidence is the share still
    misclassified (not only the share sent to the target); backdoors keep the target rate."""
    import copy

    from netmend.locate.probe import violation_rate
    from netmend.registry import fill_defaults
    from netmend.repair.masked_tune import MaskedTuneConfig, _Tuner, masked_tune_defaults
    from netmend.sites import Site, Sites

    d = adversarial_from_info(INFO, AdversarialOptions(pairs=40, eps=0.3, repair_fraction=0.05), data=digits, model=mlp)
    x, y = d.pairs.clean, (d.pairs.labels % 9) + 1          # wrong labels, none of them the target 0
    pred = mlp(x).argmax(1)
    wrong, to_target = float((pred != y).float().mean()), float((pred == 0).float().mean())
    assert wrong > to_target + 0.5
    assert violation_rate(d, mlp, x, y) == pytest.approx(wrong)
    masks = Sites([Site(layer="out")], localiser="test").masks(mlp)
    for given, tol in ((MaskedTuneConfig(), 0.02), (MaskedTuneConfig(acc_tolerance=0.005), 0.005)):
        cfg = fill_defaults(given, masked_tune_defaults, d)           # what api.repair resolves before the run
        assert _Tuner(copy.deepcopy(mlp), d, masks, None, cfg).tol == tol


def test_finetune_with_refresh_is_adversarial_training(mlp, digits):
    """`-R refresh=true`: every epoch the evidence's clean twins are attacked afresh against the model being tuned
    and trained on with their true labels — robust accuracy rises where plain fine-tuning on clean data does not
    help; a defect that cannot regenerate its evidence is told so."""
    import netmend

    d = adversarial_from_info(INFO, AdversarialOptions(pairs=100, eps=0.2, repair_fraction=0.2), data=digits, model=mlp)
    calls = []
    regenerate = d.regenerate
    d.regenerate = lambda model, x: calls.append(len(x)) or regenerate(model, x)
    r = netmend.api.repair(mlp, d, method="finetune", repair_options={"refresh": True, "epochs": 5})
    assert calls == [len(d.pairs)] * 5
    assert r.after["robust_accuracy"] > r.before["robust_accuracy"] + 0.1
    w = wrong_predictions_from_info(INFO, WrongPredictionsOptions(), data=digits, model=mlp)
    with pytest.raises(NetmendError, match="cannot regenerate"):
        netmend.api.repair(mlp, w, method="finetune", repair_options={"refresh": True})
