"""The acceptance gate: a candidate that makes the defect or accuracy worse on held-apart repair data is rejected,
the output model is the input model bit for bit, and the CLI exits with 3."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

NETMEND = shutil.which("netmend") or str(Path(sys.executable).parent / "netmend")

PLUGIN = textwrap.dedent('''
    """A deliberately harmful repairer, registered for the test through NETMEND_PLUGINS."""
    import torch

    from netmend.edit import Edit
    from netmend.registry import REPAIRERS


    @REPAIRERS.register("add-noise", "test only: adds large noise to every weight")
    def add_noise(model, defect, sites, cfg):
        g = torch.Generator().manual_seed(0)
        deltas = {n: torch.randn(p.shape, generator=g) * (p.detach().std() + 0.1) * 3
                  for n, p in model.named_parameters() if p.dim() > 1}
        return Edit(deltas, {})
''')


def run(*args, cwd=None, env=None):
    e = {**os.environ, "NETMEND_QUIET": "1", "NETMEND_THREADS": "1", **(env or {})}
    return subprocess.run([NETMEND, *map(str, args)], capture_output=True, text=True, env=e, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    (root / "noisy_plugin.py").write_text(PLUGIN)
    p = run("train", "--dataset", "digits", "--arch", "small-cnn", "--trigger-size", "2", "--epochs", "15",
            "--out", root / "model", "--json")
    assert p.returncode == 0, p.stderr
    return root


def test_harmful_repair_is_rejected_and_the_input_comes_back(model_dir, tmp_path):
    out = tmp_path / "run"
    p = run("repair", model_dir / "model", "--repair", "add-noise", "--out", out, "--json", cwd=model_dir,
            env={"NETMEND_PLUGINS": "noisy_plugin"})
    assert p.returncode == 3, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("repair rejected: "), p.stderr
    res = json.loads(p.stdout)
    assert res["accepted"] is False and res["changed_weights"] == 0
    assert res["candidate_after"]["clean_accuracy"] < res["before"]["clean_accuracy"] - 0.05
    original = load_file(str(model_dir / "model" / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accepted"] is False and "fell by" in metrics["gate"]["reason"]
    assert metrics["candidate_after"]["clean_accuracy"] == res["candidate_after"]["clean_accuracy"]
    assert (out / "candidate-edit.safetensors").is_file()
    assert json.loads((out / "model.json").read_text())["repair"]["accepted"] is False
    assert "(rejected)" in (out / "report.html").read_text()


def test_keep_rejected_writes_the_candidate_marked(model_dir, tmp_path):
    out = tmp_path / "kept"
    p = run("repair", model_dir / "model", "--repair", "add-noise", "--keep-rejected", "--out", out, "--json",
            cwd=model_dir, env={"NETMEND_PLUGINS": "noisy_plugin"})
    assert p.returncode == 3, p.stderr
    res = json.loads(p.stdout)
    assert res["accepted"] is False and res["changed_weights"] > 0 and "kept" in res["note"]
    original = load_file(str(model_dir / "model" / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(original[k], written[k]) for k in original)


def test_a_good_repair_passes_the_gate(model_dir, tmp_path):
    p = run("repair", model_dir / "model", "--method", "rectify", "--pairs", "2", "--out", tmp_path / "ok", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["accepted"] is True and res["gate"]["reason"] == "" and len(res["gate"]["checks"]) == 2


def test_gate_unit_rules(backdoored, defect):
    from netmend.gate import check

    model, _ = backdoored
    defect.prepare(model)
    same = check(defect, model, model)
    assert same.accepted and same.before == same.after
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 3)
    verdict = check(defect, model, noisy)
    assert not verdict.accepted and verdict.reason
    nan = copy.deepcopy(model)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    assert not check(defect, model, nan).accepted


def test_the_unrepaired_models_numbers_are_measured_once_per_model(backdoored, defect, monkeypatch):
    from netmend.gate import gate_before

    model, _ = backdoored
    defect.prepare(model)
    calls = []
    real = type(defect).gate_check
    monkeypatch.setattr(type(defect), "gate_check", lambda self, m: calls.append(1) or real(self, m))
    first = gate_before(defect, model)
    assert gate_before(defect, copy.deepcopy(model)) == first and len(calls) == 1   # same weights: kept
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    gate_before(defect, other)
    assert len(calls) == 2                                                           # other weights: measured


def test_bad_budget_is_one_line(model_dir, tmp_path):
    p = run("repair", model_dir / "model", "--method", "finetune", "--max-accuracy-drop", "-1", "--out", tmp_path / "x")
    assert p.returncode == 2 and "--max-accuracy-drop" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_unknown_plugin_is_one_line(model_dir, tmp_path):
    p = run("methods", env={"NETMEND_PLUGINS": "no_such_plugin_module"})
    assert p.returncode == 2 and "NETMEND_PLUGINS" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_certify_needs_a_safety_property(model_dir, tmp_path):
    p = run("repair", model_dir / "model", "--method", "finetune", "--certify", "--out", tmp_path / "c")
    assert p.returncode == 2 and "--certify" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_out_holding_user_files_is_refused(model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my own report")
    (out / "metrics.json").write_text("{}")
    p = run("repair", model_dir / "model", "--method", "finetune", "--out", out)
    assert p.returncode == 2 and "already holds files" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert (out / "report.html").read_text() == "my own report" and sorted(f.name for f in out.iterdir()) == [
        "metrics.json", "report.html"]


def _as_from_a_terminal():
    """The child starts with SIGINT and SIGTERM at their defaults and unblocked, as from an interactive shell. A
    test runner started as a background job of a non-interactive shell has SIGINT ignored, and its children inherit
    that; netmend keeps an inherited SIG_IGN, as programs do (nohup), so Ctrl-C would never reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start_repair(model_dir, out, *options) -> subprocess.Popen:
    """`netmend repair … --method finetune` running apart, quiet, on one thread, started as from a terminal."""
    env = {**os.environ, "NETMEND_QUIET": "1", "NETMEND_THREADS": "1"}
    return subprocess.Popen([NETMEND, "repair", str(model_dir / "model"), "--method", "finetune", *options,
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_as_from_a_terminal)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupted_repair_leaves_nothing(model_dir, tmp_path, sig, code, word):
    """A signal mid-repair: one line, exit 130 / 143, no run folder and no half-built sibling left."""
    out = tmp_path / "run"
    p = _start_repair(model_dir, out, "-R", "epochs=100000")
    time.sleep(10)                                   # past start-up: the repair is running
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == code, err
    assert err.strip().splitlines() == [f"netmend: {word}"]
    assert not out.exists() and not [f for f in tmp_path.iterdir() if "partial" in f.name]


def test_terminated_bench_stops_without_recording_a_failure(model_dir, tmp_path):
    """SIGTERM during a grid's cell (one worker: the cell runs in the command's own process) stops the whole grid
    with one line and exit 143; the cell is not recorded as failed, so a rerun runs it."""
    grid = tmp_path / "grid.toml"
    grid.write_text(f'seeds = [0, 1]\nmodels = ["{model_dir / "model"}"]\n\n[methods.finetune]\n'
                    'repair = { epochs = 100000 }\n')
    out = tmp_path / "bench"
    env = {**os.environ, "NETMEND_QUIET": "1", "NETMEND_THREADS": "1"}
    p = subprocess.Popen([NETMEND, "bench", str(grid), "--out", str(out), "--workers", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=_as_from_a_terminal)
    time.sleep(12)                                   # past start-up: the first cell is repairing
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "netmend: terminated"
    assert not list((out / "failed").glob("*.json")) and not list((out / "cells").iterdir())


def test_interrupt_while_loading_is_one_line(model_dir, tmp_path):
    """Ctrl-C in the first seconds, while torch and the registry load: one line and exit 130, not a traceback from
    inside an import (this used to print one, or a RecursionError)."""
    out = tmp_path / "run"
    p = _start_repair(model_dir, out)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and err.strip().splitlines() == ["netmend: interrupted"], err
    assert not out.exists()
