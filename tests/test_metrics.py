import math

import pytest

import torch

from netmend.metrics import (attack_success_rate, class_fairness_gap, defense_effectiveness_rating,
                             per_class_accuracy, robust_accuracy, wilson_interval)


def test_asr_excludes_target_class_samples():
    y = torch.tensor([0, 0, 1, 2, 3])
    pred = torch.tensor([0, 0, 0, 2, 0])      # target 0: two target-class samples predicted 0 do not count
    assert attack_success_rate(pred, y, 0) == pytest.approx(2 / 3)
    assert robust_accuracy(pred, y, 0) == pytest.approx(1 / 3)


def test_per_class_accuracy_and_fairness_gap():
    y = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    pca = per_class_accuracy(pred, y, 4)
    assert pca[:3] == [0.5, 1.0, 0.0] and math.isnan(pca[3])
    assert abs(class_fairness_gap(pca) - (0.5 - 0.0)) < 1e-9


def test_der_and_wilson():
    assert defense_effectiveness_rating({"asr": 1.0, "clean_accuracy": 0.9}, {"asr": 0.0, "clean_accuracy": 0.9}) == 1.0
    assert defense_effectiveness_rating({"asr": 0.5, "clean_accuracy": 0.9}, {"asr": 0.5, "clean_accuracy": 0.9}) == 0.5
    lo, hi = wilson_interval(0, 1000)
    assert lo < 1e-12 and 0 < hi < 0.005
