"""The user's path through the real console script, and the bad-input contract: one line on stderr,
exit code 2, no traceback, nothing written or overwritten."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NETMEND = shutil.which("netmend") or str(Path(sys.executable).parent / "netmend")
ENV = {**os.environ, "NETMEND_QUIET": "1"}


def run(*args, check=True):
    p = subprocess.run([NETMEND, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"netmend {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def assert_user_error(p, *fragments):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for f in fragments:
        assert f in p.stderr, p.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    p = run("train", "--dataset", "digits", "--arch", "small-cnn", "--trigger-size", "2", "--epochs", "15",
            "--out", out, "--json")
    res = json.loads(p.stdout)
    assert res["metrics"]["asr"] > 0.8
    return out


def test_methods_lists_registered_methods():
    p = run("methods")
    assert "finetune" in p.stdout and "fine-pruning" in p.stdout


def test_repair_writes_a_run_folder_and_json(model_dir, tmp_path):
    out = tmp_path / "run"
    p = run("repair", model_dir, "--method", "finetune", "--repair-fraction", "0.05", "--out", out, "--json")
    res = json.loads(p.stdout)
    assert set(res) >= {"method", "before", "after", "seconds", "samples_used"}
    for when in ("before", "after"):
        assert 0 <= res[when]["clean_accuracy"] <= 1 and 0 <= res[when]["asr"] <= 1
    for f in ("model.safetensors", "model.json", "edit.safetensors", "sites.json", "metrics.json", "config.json", "report.html"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["defect"]["repair_indices"]["fit"] and config["seed"] == 0
    # a run folder is a model folder
    ev = json.loads(run("evaluate", out, "--json").stdout)
    assert abs(ev["metrics"]["asr"] - res["after"]["asr"]) < 1e-6


def test_exchange_care_sites_into_masked_tune(model_dir, tmp_path):
    """`--locate causal --repair masked_tune`: CARE's flatten neurons drive INNER's repair of fc1's columns."""
    out = tmp_path / "exchange"
    p = run("repair", model_dir, "--locate", "causal", "--repair", "masked_tune", "-R", "epochs=1",
            "-R", "repair_sample_num=64", "--out", out, "--json")
    res = json.loads(p.stdout)
    assert 0 <= res["after"]["asr"] <= 1
    sites = json.loads((out / "sites.json").read_text())
    assert sites["localiser"] == "causal"
    from safetensors.torch import load_file
    assert set(load_file(out / "edit.safetensors")) <= {"fc1.weight"}


def test_bad_inputs_give_one_line_and_exit_2(model_dir, tmp_path):
    assert_user_error(run("evaluate", tmp_path / "missing", check=False), "not found")
    # corrupt / truncated weights
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run("evaluate", bad, check=False), "corrupt")
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    assert_user_error(run("evaluate", bad, check=False), "corrupt")
    # unknown architecture in model.json
    unk = tmp_path / "unk"
    shutil.copytree(model_dir, unk)
    info = json.loads((unk / "model.json").read_text())
    info["arch"] = "transformer-xxl"
    (unk / "model.json").write_text(json.dumps(info))
    assert_user_error(run("evaluate", unk, check=False), "unknown architecture")
    # a data path in the wrong format
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert_user_error(run("train", "--dataset", "image-folder", "--data-dir", notes, "--arch", "small-cnn",
                          "--out", tmp_path / "m2", check=False))
    assert not (tmp_path / "m2").exists()
    # unknown method, unknown layer
    assert_user_error(run("repair", model_dir, "--method", "magic", "--out", tmp_path / "r1", check=False), "unknown method")
    assert_user_error(run("repair", model_dir, "--method", "fine-pruning", "-L", "layer=fc9", "--out", tmp_path / "r2",
                          check=False), "fc9")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2" / "model.safetensors").exists()
    # an unknown option value of a repairer
    assert_user_error(run("repair", model_dir, "--method", "rectify", "-R", "probe_cost=nope", "--out", tmp_path / "r3",
                          check=False), "probe_cost")
    assert not (tmp_path / "r3" / "model.safetensors").exists()
    # an option value of the wrong type
    assert_user_error(run("repair", model_dir, "--method", "fine-pruning", "-R", "max_acc_drop=lots", "--out",
                          tmp_path / "r4", check=False), "max_acc_drop")
    assert not (tmp_path / "r4" / "model.safetensors").exists()


def test_out_that_holds_a_model_is_never_overwritten(model_dir):
    before = (model_dir / "model.safetensors").read_bytes()
    assert_user_error(run("repair", model_dir, "--method", "finetune", "--out", model_dir, check=False), "already holds a model")
    assert_user_error(run("train", "--dataset", "digits", "--arch", "mlp", "--out", model_dir, check=False), "already holds")
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_usage_errors_are_one_line_too():
    assert_user_error(run("repair", check=False))
    assert_user_error(run("--threads", "0", "methods", check=False), "--threads")


def test_threads_option_reaches_torch():
    """`--threads N` (or NETMEND_THREADS) sets torch's intra-op threads before the command runs."""
    import torch
    from typer.testing import CliRunner

    from netmend.cli import app

    before = torch.get_num_threads()
    try:
        assert CliRunner().invoke(app, ["--threads", "1", "methods"]).exit_code == 0 and torch.get_num_threads() == 1
        assert CliRunner().invoke(app, ["methods"], env={"NETMEND_THREADS": "2"}).exit_code == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


ACAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "acasxu"


@pytest.mark.skipif(not (ACAS / "nnet").is_dir(), reason="ACAS Xu files not found under ../shared/data/acasxu")
def test_defect_seed_option_is_not_overridden_by_the_default_seed(tmp_path):
    """`-d seed=N` picks the defect's seeds (evidence, metrics); the command's own --seed (default 0) must not
    silently replace it. Fine-tuning an argmin network through the console script, small metric budgets."""
    net = ACAS / "nnet" / "ACASXU_run2a_2_9_batch_2000.nnet"
    small = ["-d", "eval_samples=2000", "-d", "fidelity_samples=2000", "-d", "counterexamples=100", "-d", "satisfying=100",
             "-d", "heldout_counterexamples=100", "-R", "epochs=2"]
    run("repair", net, "--property", ACAS / "vnnlib" / "prop_8.vnnlib", "--method", "finetune", "-d", "seed=5", *small,
        "--no-gate", "--out", tmp_path / "r", "--json")          # seeds, not the repair's quality, are tested here
    seeds = json.loads((tmp_path / "r" / "config.json").read_text())["defect"]["seeds"]
    assert seeds["repair"] == 5 and seeds["fidelity"] == 9


@pytest.mark.skipif(not (ACAS / "nnet").is_dir(), reason="ACAS Xu files not found under ../shared/data/acasxu")
def test_property_patch_through_the_cli_is_certified_and_its_run_folder_reloads(tmp_path):
    """The user's path for the local patch: repair a .nnet with --certify, then `netmend verify` and `netmend
    evaluate` read the run folder, whose model is the wider chain (model.json records its widths)."""
    net = ACAS / "nnet" / "ACASXU_run2a_2_9_batch_2000.nnet"
    prop = ACAS / "vnnlib" / "prop_8.vnnlib"
    small = ["-d", "eval_samples=20000", "-d", "fidelity_samples=5000"]
    res = json.loads(run("repair", net, "--property", prop, "--method", "property-patch", "--certify", *small,
                         "--out", tmp_path / "r", "--json").stdout)
    assert res["accepted"] and res["after"]["verified"] and res["after"]["fidelity"] == 1.0
    hidden = json.loads((tmp_path / "r" / "model.json").read_text())["arch_args"]["hidden"]
    assert len(hidden) == 7 and hidden[0] > 50
    v = json.loads(run("verify", tmp_path / "r", "--property", prop, "--timeout", "30", "--json").stdout)
    assert v["status"] == "verified"
    again = json.loads(run("evaluate", tmp_path / "r", *small, "--json").stdout)["metrics"]
    assert again["violation_rate"] == 0 and again["counterexamples_found"] == 0


def test_train_a_spurious_model_and_repair_it(tmp_path):
    """--spurious-class stamps the trigger on part of one class's images, labels kept; repair reads the recorded
    defect. Bad combinations are one-line errors that write nothing."""
    out = tmp_path / "spur"
    p = run("train", "--dataset", "digits", "--arch", "small-cnn", "--trigger-size", "2", "--spurious-class", "1",
            "--epochs", "3", "--out", out, "--json")
    assert {"spur", "pattern_pull_rate", "overall_accuracy"} <= set(json.loads(p.stdout)["metrics"])
    assert json.loads((out / "model.json").read_text())["defect"]["kind"] == "spurious"
    res = json.loads(run("repair", out, "--method", "p-clarc", "--pairs", "3", "--no-gate", "--out", tmp_path / "r",
                         "--json").stdout)                     # three epochs of training: the repair's quality varies
    assert {"spur", "pattern_pull_rate"} <= set(res["after"])
    assert_user_error(run("train", "--dataset", "digits", "--arch", "small-cnn", "--trigger", "none",
                          "--spurious-class", "1", "--out", tmp_path / "x", check=False), "--spurious-class")
    assert_user_error(run("train", "--dataset", "digits", "--arch", "small-cnn", "--spurious-class", "10",
                          "--out", tmp_path / "y", check=False), "spurious class 10")
    assert_user_error(run("train", "--dataset", "census", "--arch", "mlp", "--spurious-class", "0",
                          "--out", tmp_path / "z", check=False), "--spurious-class", "census")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_train_with_the_field_recipe_records_it(tmp_path):
    """--recipe field trains with SGD, the cosine schedule and crop + flip, and model.json says so; an unknown
    recipe, or one for a tabular dataset, is a one-line error that writes nothing."""
    out = tmp_path / "field"
    run("train", "--dataset", "digits", "--arch", "small-cnn", "--trigger-size", "2", "--recipe", "field",
        "--epochs", "2", "--out", out, "--json")
    training = json.loads((out / "model.json").read_text())["training"]
    assert (training["optimizer"], training["schedule"], training["augment"]) == ("sgd", "cosine", "crop-flip")
    assert_user_error(run("train", "--dataset", "digits", "--arch", "small-cnn", "--recipe", "fast",
                          "--out", tmp_path / "x", check=False), "--recipe must be one of netmend, field")
    assert_user_error(run("train", "--dataset", "census", "--arch", "mlp", "--recipe", "field",
                          "--out", tmp_path / "y", check=False), "--recipe applies to image datasets")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_train_a_mislabelled_model_and_repair_its_wrong_predictions(tmp_path):
    """--mislabel-class labels part of one class as another in training; the model records a wrong-predictions
    defect, and `inner` repairs it from the misclassified repair samples: most held-out test errors of the evidence
    classes fixed, clean accuracy up. Bad values are one-line errors that write nothing."""
    out = tmp_path / "mis"
    p = run("train", "--dataset", "digits", "--arch", "small-cnn", "--mislabel-class", "3", "--mislabel-as", "8",
            "--mislabel-fraction", "0.45", "--out", out, "--json")
    m = json.loads(p.stdout)["metrics"]
    assert m["source_as_class"] > 0.5 > m["source_accuracy"]          # the model learnt the mistake
    info = json.loads((out / "model.json").read_text())
    assert info["defect"]["kind"] == "wrong-predictions" and info["defect"]["mislabelled"]["as"] == 8
    res = json.loads(run("repair", out, "--method", "inner", "--out", tmp_path / "r", "--json").stdout)
    b, a = res["before"], res["after"]
    assert b["heldout_fixed"] == 0 and a["heldout_fixed"] >= 0.5 and a["clean_accuracy"] > b["clean_accuracy"]
    for flags, msg in ((["--mislabel-class", "3", "--mislabel-as", "3"], "itself"),
                       (["--mislabel-class", "10"], "0..9"),
                       (["--mislabel-class", "3", "--mislabel-fraction", "0"], "fraction"),
                       (["--mislabel-class", "3", "--spurious-class", "1"], "give one")):
        bad = tmp_path / f"bad{len(msg)}"
        assert_user_error(run("train", "--dataset", "digits", "--arch", "mlp", *flags, "--out", bad, check=False), msg)
        assert not bad.exists()
    # the repair data must split into non-empty fit and validation parts; a test subset needs a positive size
    for k, (opt, msg) in enumerate((("val_fraction=1.0", "val_fraction must be in (0, 1)"),
                                    ("val_fraction=0", "val_fraction must be in (0, 1)"),
                                    ("val_fraction=-0.1", "val_fraction must be in (0, 1)"),
                                    ("eval_limit=-5", "eval_limit must be ≥ 1"))):
        bad = tmp_path / f"bad-opt{k}"
        assert_user_error(run("repair", out, "--method", "finetune", "-d", opt, "--out", bad, check=False), msg)
        assert not bad.exists()


def test_train_blockmnist_records_the_leakage_defect(shared_data, tmp_path):
    out = tmp_path / "block"
    run("train", "--dataset", "blockmnist", "--arch", "small-cnn", "--epochs", "1", "--data-dir", shared_data,
        "--out", out)
    info = json.loads((out / "model.json").read_text())
    assert info["defect"]["kind"] == "leakage" and info["defect"]["pair_candidates"]
    res = json.loads(run("repair", out, "--method", "p-clarc", "--data-dir", shared_data, "-d", "ig_samples=20",
                         "--out", tmp_path / "r", "--json").stdout)
    assert {"leakage", "net_leakage"} <= set(res["after"])
