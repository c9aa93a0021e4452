"""Bad input and interruptions (issue 24): every user mistake is one line on stderr, exit code 2, and nothing
written — for model.json, data values, VNN-LIB properties and networks, options — and JSON output is strict
JSON; the same seed gives the same bytes.

Most cases run the console entry (`netmend.cli.main`) in this process (each fails before any work); the
determinism check runs the real console script twice."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import import_user_module
import torch

from netmend.errors import NetmendError

NETMEND = shutil.which("netmend") or str(Path(sys.executable).parent / "netmend")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `netmend ARGS` in this process: (exit code, stderr, stdout)."""
    from netmend import cli as netmend_cli

    argv, term = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["netmend", *map(str, args)]
    code = 0
    try:
        netmend_cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, term)
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_one_line(capsys, *args, fragments=(), out=None):
    code, err, _ = cli(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for f in fragments:
        assert f in err, err
    if out is not None:
        out = Path(out)
        assert not out.exists()
        if out.parent.is_dir():
            assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".netmend-probe-" in p.name]
    return lines[0]


def strict_json(text: str):
    def refuse(c):
        raise AssertionError(f"bare {c} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, digits):
    """A tiny backdoored digits MLP saved as a model folder (two epochs: seconds)."""
    from netmend.data.triggers import TriggerSpec
    from netmend.modelio import save_model_folder
    from netmend.train import TrainConfig, train_backdoored

    model, info = train_backdoored("digits", "mlp", TriggerSpec(kind="badnets", size=2), target=0,
                                   cfg=TrainConfig(epochs=2, seed=0), data=digits)
    return save_model_folder(tmp_path_factory.mktemp("bad-input") / "model", model, info)


USER_NET = textwrap.dedent('''
    from torch import nn


    def make():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
''')


@pytest.fixture(scope="module")
def user(tmp_path_factory, digits):
    """A user's folder: a factory module, its (lightly trained) weights, x.npz and ev.npz."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad-input-user")
    badinputnet = import_user_module(root, "badinputnet", USER_NET)
    torch.manual_seed(0)
    net = badinputnet.make()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(digits.x_train), digits.y_train).backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "w.safetensors"))
    x, y = digits.x_train[:300].numpy(), digits.y_train[:300].numpy()
    np.savez(root / "x.npz", x=x, y=y)
    trig = x[:20].copy()
    trig[:, :, 6:8, 6:8] = 1.0
    np.savez(root / "ev.npz", triggered=trig, clean=x[:20])
    zero = y == 0                                   # evidence of a class the model gets right: no held-out mistakes
    np.savez(root / "evm.npz", x=x[zero][:10], y=y[zero][:10])
    return root


# ----------------------------------------------------------------------------- 1. model.json

MUTATIONS = {
    "no dataset": (lambda i: i.pop("dataset"), "dataset"),
    "in_shape negative": (lambda i: i["arch_args"].update(in_shape=[1, -8, 8]), "arch_args.in_shape.1"),
    "in_shape text": (lambda i: i["arch_args"].update(in_shape="1x8x8"), "arch_args.in_shape"),
    "in_shape huge": (lambda i: i["arch_args"].update(in_shape=[1, 100000, 100000]), "in_shape"),
    "num_classes text": (lambda i: i["arch_args"].update(num_classes="10"), "arch_args.num_classes"),
    "num_classes 0": (lambda i: i["arch_args"].update(num_classes=0), "arch_args.num_classes"),
    "num_classes 1e10": (lambda i: i["arch_args"].update(num_classes=10 ** 10), "arch_args.num_classes"),
    "arch a list": (lambda i: i.update(arch=["mlp"]), "arch"),
    "arch_args a list": (lambda i: i.update(arch_args=[1, 8, 8]), "arch_args"),
    "hidden negative": (lambda i: i["arch_args"].update(hidden=[-5, 128]), "arch_args.hidden"),
    "hidden huge": (lambda i: i["arch_args"].update(hidden=[10 ** 9]), "arch_args.hidden"),
    "mean text": (lambda i: i["arch_args"].update(mean="0.3"), "arch_args.mean"),
    "std NaN": (lambda i: i["arch_args"].update(std=[float("nan")]), "arch_args.std.0"),
    "trigger missing": (lambda i: i["defect"].pop("trigger"), "trigger"),
    "trigger unknown key": (lambda i: i["defect"]["trigger"].update(colour="red"), "defect.trigger.colour"),
    "target out of range": (lambda i: i["defect"].update(target=99), "defect.target"),
    "model_file a path": (lambda i: i.update(model_form="onnx", model_file="../../elsewhere.onnx"), "model_file"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_model_json_is_checked_field_by_field(model_dir, tmp_path, case):
    from netmend.modelio import load_model_folder

    mutate, field = MUTATIONS[case]
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    info = json.loads((bad / "model.json").read_text())
    mutate(info)
    (bad / "model.json").write_text(json.dumps(info))
    with pytest.raises(NetmendError) as exc:
        load_model_folder(bad)
    msg = str(exc.value)
    assert "\n" not in msg and field in msg and "model.json" in msg, msg


def test_model_json_errors_through_the_cli_write_nothing(model_dir, tmp_path, capsys):
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    info = json.loads((bad / "model.json").read_text())
    info["arch_args"]["hidden"] = [10 ** 9]
    (bad / "model.json").write_text(json.dumps(info))
    assert_one_line(capsys, "repair", bad, "--method", "finetune", "--out", tmp_path / "run",
                    fragments=["arch_args.hidden"], out=tmp_path / "run")
    # --defect backdoor on a model that records none: its trigger is named, not a KeyError
    info = json.loads((model_dir / "model.json").read_text())
    clean = tmp_path / "clean"
    shutil.copytree(model_dir, clean)
    info["defect"] = {"kind": "clean"}
    (clean / "model.json").write_text(json.dumps(info))
    assert_one_line(capsys, "evaluate", clean, "--defect", "backdoor", fragments=["trigger"])


def test_absurd_sizes_never_reach_the_allocator():
    """Within every per-field limit, the model is still counted on the meta device before it is built."""
    from netmend.modelio import build_model
    from netmend.schema import MAX_PARAMETERS

    info = {"arch": "mlp", "arch_args": {"in_shape": [3, 2048, 2048], "num_classes": 10, "hidden": [65536]}}
    with pytest.raises(NetmendError, match=f"limit is {MAX_PARAMETERS:,}"):
        build_model(info)


def test_every_model_json_netmend_writes_still_validates(model_dir):
    """Image models, tabular (fairness) models, ACAS Xu networks and run folders of users' own models."""
    from netmend.schema import validate_model_info
    from netmend.zoo.acasxu import STANDARD_NORMALISATION, _info

    validate_model_info(json.loads((model_dir / "model.json").read_text()))
    acas = _info(Path("ACASXU_run2a_2_9_batch_2000.nnet"), [5, 50, 50, 5], dict(STANDARD_NORMALISATION), "nnet")
    validate_model_info(json.loads(json.dumps(acas)))
    validate_model_info({**acas, "defect": {"kind": "safety", "property": "prop_8.vnnlib", "box": "official"},
                         "metrics": {"fidelity": 0.99}, "repair": {"method": "care"}, "repairs": ["care"]})
    validate_model_info({"arch": "mlp", "arch_args": {"in_shape": [13], "num_classes": 2, "mean": [0.0] * 13,
                                                      "std": [1.0] * 13, "hidden": [64, 32, 16, 8, 4]},
                         "dataset": "census", "data_dir": None, "classes": ["0", "1"], "split_seed": 0,
                         "test_fraction": 0.2, "pool_fraction": 0.1,
                         "defect": {"kind": "fairness", "protected": ["sex"], "protected_indices": [8]}})
    validate_model_info({"model_form": "onnx", "source": "net.onnx", "model_path": "/x/net.onnx",
                         "defect": {"kind": "backdoor", "target": 3},          # the user's evidence: no trigger spec
                         "model_file": "model.onnx", "parent": "/x/net.onnx", "user_data": {"data": "/x/x.npz"}})


# ----------------------------------------------------------------------------- 2. data values

def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width × height pixels (and holds almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_data_values_are_checked_when_loaded(tmp_path):
    from netmend.data.user_data import load_evidence, load_user_data

    x = np.random.default_rng(0).random((30, 1, 8, 8)).astype(np.float32)
    y = np.arange(30) % 3
    cases = {
        "fractional labels": (dict(x=x, y=y + 0.5), "whole class indices"),
        "NaN pixel": (dict(x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y=y), "NaN"),
        "Inf pixel": (dict(x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x), y=y), "NaN or infinite"),
        "float pixels 0-255": (dict(x=x * 255, y=y), "must hold values in [0, 1]"),
        "negative float pixels": (dict(x=x - 3, y=y), "must hold values in [0, 1]"),
        "int16 pixels beyond 255": (dict(x=(x * 300).astype(np.int16), y=y), "0..255"),
        "label 1e20": (dict(x=x, y=np.full(30, 1e20)), "larger than any class index"),
    }
    for name, (arrays, fragment) in cases.items():
        np.savez(tmp_path / "d.npz", **arrays)
        with pytest.raises(NetmendError, match=None) as exc:
            load_user_data(tmp_path / "d.npz")
        assert fragment in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))
    np.savez(tmp_path / "ok.npz", x=(x * 255).astype(np.uint8), y=y)              # uint8 images are scaled
    assert float(load_user_data(tmp_path / "ok.npz").x.max()) <= 1.0
    np.savez(tmp_path / "tab.npz", x=x.reshape(30, -1) * 100 - 50, y=y)          # tabular features: any range
    assert load_user_data(tmp_path / "tab.npz").kind == "tabular"
    np.savez(tmp_path / "ev.npz", triggered=x * 255, clean=x * 255)
    with pytest.raises(NetmendError, match=r"triggered: float images must hold values in \[0, 1\]"):
        load_evidence(tmp_path / "ev.npz")


def test_labels_outside_the_model_classes_and_bad_files_through_the_cli(user, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(user)
    base = ["repair", "badinputnet:make", "--weights", user / "w.safetensors", "--method", "finetune"]
    z = np.load(user / "x.npz")
    np.savez(tmp_path / "l10.npz", x=z["x"], y=np.where(z["y"] == 9, 10, z["y"]))
    assert_one_line(capsys, *base, "--data", tmp_path / "l10.npz", "--evidence", user / "ev.npz", "--out",
                    tmp_path / "r1", fragments=["label 10", "0..9"], out=tmp_path / "r1")
    np.savez(tmp_path / "f255.npz", x=z["x"] * 255, y=z["y"])
    assert_one_line(capsys, *base, "--data", tmp_path / "f255.npz", "--evidence", user / "ev.npz", "--out",
                    tmp_path / "r2", fragments=["[0, 1]"], out=tmp_path / "r2")
    (tmp_path / "empty.csv").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_one_line(capsys, *base, "--data", tmp_path / "empty.csv", "--label-column", "y", "--protected", "a",
                        "--out", tmp_path / "r3", fragments=["no data rows"], out=tmp_path / "r3")


def test_decompression_bomb_corrupt_archives_and_pixel_csv(tmp_path):
    from PIL import Image

    from netmend.data.datasets import MAX_IMAGE_PIXELS, read_class_folders, read_pixel_csv

    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tree / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tree / split / cls / "0.png")
    (tree / "train" / "a" / "1.png").write_bytes(_png_header(100_000, 100_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no DecompressionBombWarning either
        with pytest.raises(NetmendError, match=f"{MAX_IMAGE_PIXELS:,}") as exc:
            read_class_folders(tree)
    assert "train/a/1.png" in str(exc.value) and "\n" not in str(exc.value)
    (tree / "train" / "a" / "1.png").write_bytes(_png_header(10_000, 10_000))   # PIL would only warn here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NetmendError, match="limit"):
            read_class_folders(tree)
    (tree / "train" / "a" / "1.png").unlink()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tree, arcname="d")
    good = buf.getvalue()
    corrupt = {"random.tar.gz": os.urandom(2048), "truncated.tar.gz": good[: len(good) // 2],
               "garbage-inside.tar.gz": gzip.compress(os.urandom(3000))}
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(NetmendError, match="cannot read image archive") as exc:
            read_class_folders(tmp_path / name)
        assert "\n" not in str(exc.value), str(exc.value)
    rows = np.random.default_rng(0).integers(0, 255, (4, 17)).astype(float)
    rows[:, -1] = 1
    rows[2, 5] = 300                                 # would wrap to 44 as uint8
    np.savetxt(tmp_path / "p.csv", rows, delimiter=",", fmt="%g")
    with pytest.raises(NetmendError, match="line 3, pixel 5: 300"):
        read_pixel_csv(tmp_path / "p.csv", side=4)
    (tmp_path / "empty.csv").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NetmendError, match="no rows"):
            read_pixel_csv(tmp_path / "empty.csv", side=4)


# ----------------------------------------------------------------------------- 3. VNN-LIB, networks, JSON

PROP = textwrap.dedent('''
    (declare-const X_0 Real)
    (declare-const X_1 Real)
    (declare-const Y_0 Real)
    (declare-const Y_1 Real)
    (assert (>= X_0 0.0))
    (assert (<= X_0 1.0))
    (assert (>= X_1 0.0))
    (assert (<= X_1 1.0))
''')


def test_vnnlib_limits_and_network_fit():
    from netmend.data.vnnlib import MAX_DISJUNCTS, MAX_NESTING, check_network, parse_vnnlib

    ok = parse_vnnlib(PROP + "(assert (<= Y_0 Y_1))")
    deep = "X_0"
    for _ in range(5000):
        deep = f"(+ {deep} 0)"
    with pytest.raises(NetmendError, match=f"nested more than {MAX_NESTING}"):
        parse_vnnlib(PROP + f"(assert (<= {deep} 1))")
    nested_and = "(<= Y_0 Y_1)"
    for _ in range(5000):
        nested_and = f"(and {nested_and})"
    with pytest.raises(NetmendError, match="nested"):
        parse_vnnlib(PROP + f"(assert {nested_and})")
    blowup = " ".join("(or (<= Y_0 Y_1) (<= Y_1 Y_0))" for _ in range(40))
    with pytest.raises(NetmendError, match=f"{MAX_DISJUNCTS:,}"):
        parse_vnnlib(PROP + f"(assert (and {blowup}))")
    with pytest.raises(NetmendError, match="X_999999999"):
        parse_vnnlib(PROP + "(declare-const X_999999999 Real)(assert (<= Y_0 Y_1))")
    three = parse_vnnlib(PROP.replace("(declare-const Y_0 Real)", "(declare-const X_2 Real)\n(declare-const Y_0 Real)")
                         + "(assert (>= X_2 0.0))(assert (<= X_2 1.0))(assert (<= Y_0 Y_1))")
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    check_network(ok, net, [2])
    with pytest.raises(NetmendError, match="3 inputs .* the network takes 2"):
        check_network(three, net, [2])
    with pytest.raises(NetmendError, match="3 inputs"):
        check_network(three, net)                    # no recorded shape: a forward pass tells


def _chain_onnx(path: Path, nan: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    w1, w2 = g.normal(size=(5, 8)).astype(np.float32), g.normal(size=(8, 5)).astype(np.float32)
    if nan:
        w1[0, 0] = np.nan
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (np.zeros(8, np.float32), "b1"),
                                                         (w2, "w2"), (np.zeros(5, np.float32), "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_networks_with_nan_weights_are_refused(tmp_path, capsys):
    from netmend.modelio import load_any_model

    _chain_onnx(tmp_path / "ok.onnx", nan=False)
    load_any_model(tmp_path / "ok.onnx")
    _chain_onnx(tmp_path / "nan.onnx", nan=True)
    with pytest.raises(NetmendError, match="NaN"):
        load_any_model(tmp_path / "nan.onnx")
    (tmp_path / "p.vnnlib").write_text(PROP.replace("X_1 Real)", "X_1 Real)\n(declare-const X_2 Real)\n"
                                                    "(declare-const X_3 Real)\n(declare-const X_4 Real)")
                                       .replace("Y_1 Real)", "Y_1 Real)\n(declare-const Y_2 Real)\n"
                                                "(declare-const Y_3 Real)\n(declare-const Y_4 Real)")
                                       + "".join(f"(assert (>= X_{i} 0.0))(assert (<= X_{i} 1.0))" for i in (2, 3, 4))
                                       + "(assert (<= Y_0 Y_1))")
    assert_one_line(capsys, "repair", tmp_path / "nan.onnx", "--property", tmp_path / "p.vnnlib", "--method",
                    "finetune", "--out", tmp_path / "run", fragments=["NaN"], out=tmp_path / "run")


def test_json_output_has_no_bare_nan(user, tmp_path, capsys, monkeypatch):
    from netmend.jsonsafe import dumps, json_safe
    from netmend.modelio import write_json

    obj, notes = json_safe({"after": {"asr": float("nan"), "ok": 0.5}, "norms": [float("inf"), np.float32("-inf")]})
    assert obj == {"after": {"asr": None, "ok": 0.5}, "norms": [None, None]}
    assert notes == ["after.asr: NaN written as null", "norms[0]: Infinity written as null",
                     "norms[1]: -Infinity written as null"]
    assert strict_json(dumps({"x": float("nan"), "notes": ["earlier"]}))["notes"] == ["earlier", "x: NaN written as null"]
    write_json(tmp_path / "m.json", {"before": {"fixed": torch.tensor(float("nan"))}})
    assert strict_json((tmp_path / "m.json").read_text())["notes"] == ["before.fixed: NaN written as null"]
    # through the CLI: evidence of a class the model never gets wrong leaves no held-out mistakes (a NaN metric)
    monkeypatch.chdir(user)
    args = ["badinputnet:make", "--weights", user / "w.safetensors", "--data", user / "x.npz", "--evidence",
            user / "evm.npz"]
    code, err, out = cli(capsys, "evaluate", *args, "--json")
    assert code == 0, err
    shown = strict_json(out)
    assert shown["metrics"]["heldout_fixed"] is None and shown["notes"] == ["metrics.heldout_fixed: NaN written as null"]
    run = tmp_path / "run"
    code, err, out = cli(capsys, "repair", *args, "--method", "finetune", "-R", "epochs=1", "--out", run, "--json")
    assert code == 0, err
    assert "before.heldout_fixed: NaN written as null" in strict_json(out)["notes"]
    for name in ("metrics.json", "config.json", "sites.json", "model.json"):
        strict_json((run / name).read_text())
    assert "after.heldout_fixed: NaN written as null" in strict_json((run / "metrics.json").read_text())["notes"]


# ----------------------------------------------------------------------------- 4. options

def test_out_that_cannot_be_created(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    repair = ["repair", model_dir, "--method", "finetune"]
    assert_one_line(capsys, *repair, "--out", tmp_path / "afile" / "run", fragments=["is a file"])
    assert_one_line(capsys, "train", "--dataset", "digits", "--arch", "mlp", "--out", tmp_path / "afile" / "a" / "b",
                    fragments=["is a file"])
    assert_one_line(capsys, *repair, "--out", tmp_path / ("r" * 300), fragments=["bytes"])
    assert_one_line(capsys, *repair, "--out", tmp_path / ("r" * 230), fragments=["at most"], out=tmp_path / ("r" * 230))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    assert_one_line(capsys, *repair, "--out", locked / "run", fragments=["read-only"], out=locked / "run")
    monkeypatch.undo()
    if os.geteuid() != 0:                            # a real read-only folder (root writes anywhere)
        locked.chmod(0o555)
        try:
            assert_one_line(capsys, *repair, "--out", locked / "run", fragments=["cannot create"], out=locked / "run")
        finally:
            locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_unavailable_or_unknown_devices(model_dir, tmp_path, capsys):
    missing = f"cuda:{torch.cuda.device_count() + 3}" if torch.cuda.is_available() else "cuda"
    for device, fragment in ((missing, "this machine has: cpu"), ("tpu", "not a device name"), ("cpu:x", "not a device")):
        out = tmp_path / f"r-{device.replace(':', '')}"
        assert_one_line(capsys, "repair", model_dir, "--method", "finetune", "--device", device, "--out", out,
                        fragments=[fragment], out=out)
    assert_one_line(capsys, "train", "--dataset", "digits", "--arch", "mlp", "--device", missing, "--out",
                    tmp_path / "t", fragments=["--device"], out=tmp_path / "t")


def test_numeric_options_are_checked_centrally(model_dir, tmp_path, capsys):
    for k, (opt, fragment) in enumerate((("epochs=-5", "must be > 0"), ("epochs=0", "must be > 0"),
                                         ("lr=NaN", "finite"), ("lr=Infinity", "finite"), ("lr=-0.1", "> 0"),
                                         ("batch_size=0", "> 0"))):
        out = tmp_path / f"r{k}"
        assert_one_line(capsys, "repair", model_dir, "--method", "finetune", "-R", opt, "--out", out,
                        fragments=[opt.split("=")[0], fragment], out=out)
    assert_one_line(capsys, "repair", model_dir, "--method", "finetune", "-d", "repair_fraction=NaN", "--out",
                    tmp_path / "d", fragments=["repair_fraction", "finite"], out=tmp_path / "d")
    assert_one_line(capsys, "repair", model_dir, "--method", "finetune", "--repair-fraction", "nan", "--out",
                    tmp_path / "f", fragments=["--repair-fraction"], out=tmp_path / "f")
    for epochs in ("0", "-1"):
        assert_one_line(capsys, "train", "--dataset", "digits", "--arch", "mlp", "--epochs", epochs, "--out",
                        tmp_path / f"t{epochs}", fragments=["--epochs"], out=tmp_path / f"t{epochs}")
    from netmend.registry import check_config
    from netmend.train import TrainConfig

    with pytest.raises(NetmendError, match="lr"):
        check_config(TrainConfig(lr=float("nan")))
    check_config(TrainConfig())


# ----------------------------------------------------------------------------- 5. determinism

def test_same_seed_gives_the_same_bytes(model_dir, tmp_path):
    """Two processes, the same repair and seed: model.safetensors and edit.safetensors are equal byte for byte
    (rectify records its wall-clock time in the edit's metadata: it is kept out of the file header)."""
    env = {**os.environ, "NETMEND_QUIET": "1", "NETMEND_THREADS": "1"}
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        p = subprocess.run([NETMEND, "repair", str(model_dir), "--method", "rectify", "--pairs", "1", "-R",
                            "rounds=2", "--keep-rejected", "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert p.returncode in (0, 3), p.stderr
        outs.append(out)
    for name in ("model.safetensors", "edit.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    from safetensors import safe_open

    with safe_open(str(outs[0] / "edit.safetensors"), "pt") as f:
        assert "seconds" not in f.metadata()["netmend_edit"]
