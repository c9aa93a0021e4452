"""train → repair → evaluate on the embedded digits data, through the Python API."""
import copy

import pytest
import torch

import netmend
from netmend.errors import NetmendError
from netmend.modelio import load_model_folder, save_model_folder


def test_backdoor_is_learned(backdoored):
    _, info = backdoored
    assert info["metrics"]["clean_accuracy"] > 0.9 and info["metrics"]["asr"] > 0.9


def test_finetune_repair_never_touches_the_input_model(backdoored, defect):
    model, _ = backdoored
    snapshot = copy.deepcopy(model.state_dict())
    result = netmend.repair(model, defect, method="finetune")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])
    assert result.after["clean_accuracy"] > 0.8
    assert set(result.summary()) >= {"method", "before", "after", "seconds", "samples_used"}
    result.edit.revert(result.model)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_fine_pruning_lowers_asr(backdoored, defect):
    model, _ = backdoored
    result = netmend.repair(model, defect, method="fine-pruning")
    assert result.edit.meta["pruned_units"], "nothing was pruned"
    assert result.after["clean_accuracy"] > 0.8


def test_model_folder_round_trip(tmp_path, backdoored):
    model, info = backdoored
    save_model_folder(tmp_path / "m", model, info)
    again, info2 = load_model_folder(tmp_path / "m")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(again(x), model.eval()(x)) and info2["arch"] == "small-cnn"
    with pytest.raises(NetmendError, match="already holds a model"):
        save_model_folder(tmp_path / "m", model, info)


def test_pairs_more_than_available_is_a_clear_error(backdoored, digits):
    from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info

    with pytest.raises(NetmendError, match="--pairs"):
        backdoor_from_info(backdoored[1], BackdoorOptions(pairs=100000, repair_fraction=0.1), data=digits)


def test_no_trigger_asr_is_the_same_rate_on_clean_images(backdoored, defect):
    """asr_clean: non-target clean test images classified as the target — what ASR would read with no backdoor."""
    from netmend.metrics import attack_success_rate, predict

    model, _ = backdoored
    m = defect.metrics(model)
    direct = attack_success_rate(predict(model, defect.x_test), defect.y_test, defect.target)
    assert m["asr_clean"] == pytest.approx(direct)
    assert m["asr_clean"] < 0.1 < 0.9 < m["asr"]


def test_image_mlp_is_wide_enough_and_reloads_as_saved(tmp_path):
    """The tabular mlp default (64-32-16-8-4) cannot separate ten image classes; image training widens it and
    records the widths in model.json, so loading rebuilds the same net (and old files still load the old one)."""
    from netmend.modelio import build_model
    from netmend.train import TrainConfig, train_backdoored

    model, info = train_backdoored("digits", "mlp", None, cfg=TrainConfig(epochs=10, seed=0))
    assert info["metrics"]["clean_accuracy"] > 0.85
    assert info["arch_args"]["hidden"] == [256, 128]
    save_model_folder(tmp_path / "m", model, info)
    again, _ = load_model_folder(tmp_path / "m")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    legacy = {**info, "arch_args": {k: v for k, v in info["arch_args"].items() if k != "hidden"}}
    assert build_model(legacy).fc5.out_features == 4
