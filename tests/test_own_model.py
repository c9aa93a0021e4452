"""A user's own model, data and evidence through the real console script.

The model is defined here only (not in the zoo): BatchNorm and a residual add, trained on the embedded
digits with a trigger of this file's own (a 3-pixel bar and a dot on the top edge, not a built-in pattern)
towards class 3. It goes in as `package.module:factory --weights`, as ONNX and as a torch.export program;
the repaired model comes back in the same form and must load in plain PyTorch / onnxruntime and give the
numbers netmend reported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import import_user_module
import torch
from test_cli import assert_user_error

NETMEND = shutil.which("netmend") or str(Path(sys.executable).parent / "netmend")
TARGET = 3

NET_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(8 * 4 * 4, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            h = F.relu(self.bn2(self.conv2(h)) + h)
            h = self.pool(h).flatten(1)
            return self.fc2(F.relu(self.fc1(h)))


    def make():
        return Net()


    def not_a_module():
        return 42
''')


def stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, 0, 3:6] = torch.tensor([1.0, 0.0, 1.0])
    x[:, :, 1, 4] = 1.0
    return x


def run(*args, cwd=None, check=True):
    env = {**os.environ, "NETMEND_QUIET": "1", "NETMEND_THREADS": "1"}
    p = subprocess.run([NETMEND, *map(str, args)], capture_output=True, text=True, env=env, timeout=900, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"netmend {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def user(tmp_path_factory, digits):
    """A folder as a user has it: their module, weights, ONNX and .pt2 exports, x.npz and ev.npz."""
    root = tmp_path_factory.mktemp("own")
    usernet = import_user_module(root, "usernet", NET_SOURCE)
    torch.manual_seed(0)
    x, y = digits.x_train, digits.y_train
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    tr, pool = perm[:1000], perm[1000:]
    xt, yt = x[tr].clone(), y[tr].clone()
    poison = torch.randperm(len(tr), generator=torch.Generator().manual_seed(2))[:100]
    xt[poison], yt[poison] = stamp(xt[poison]), TARGET
    model = usernet.make()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(30):
        model.train()
        for i in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i]), yt[i]).backward()
            opt.step()
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "net.safetensors"))
    torch.save(model.state_dict(), root / "net.pt")
    xp, yp = x[pool], y[pool]
    np.savez(root / "x.npz", x=xp[:200].numpy(), y=yp[:200].numpy(), x_test=digits.x_test.numpy(),
             y_test=digits.y_test.numpy())
    keep = yp[200:] != TARGET
    ev = xp[200:][keep]
    np.savez(root / "ev.npz", triggered=stamp(ev).numpy(), clean=ev.numpy(), labels=yp[200:][keep].numpy())
    example = x[:2]
    torch.onnx.export(model, (example,), str(root / "net.onnx"), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("n", min=1)},))
    torch.export.save(ep, str(root / "net.pt2"))
    with torch.no_grad():
        nt = digits.y_test != TARGET
        asr = float((model(stamp(digits.x_test[nt])).argmax(1) == TARGET).float().mean())
        acc = float((model(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert asr > 0.9 and acc > 0.9, (asr, acc)
    return {"root": root, "module": usernet, "x_test": digits.x_test, "y_test": digits.y_test,
            "ev": np.load(root / "ev.npz")}


def check_written(user, res, logits_fn):
    """Clean accuracy and held-out-evidence ASR recomputed outside netmend from the written model (0.1 point)."""
    pred = logits_fn(user["x_test"].numpy()).argmax(1)
    acc = float((pred == user["y_test"].numpy()).mean())
    assert abs(acc - res["after"]["clean_accuracy"]) <= 0.001, (acc, res["after"])
    held = json.loads((res["_out"] / "config.json").read_text())["defect"]["heldout_evidence_indices"]
    ev = user["ev"]
    hit = logits_fn(ev["triggered"][held]).argmax(1) == TARGET
    assert abs(float(hit.mean()) - res["after"]["asr"]) <= 0.001, (float(hit.mean()), res["after"]["asr"])


FORMS = {
    "factory": lambda u: ["usernet:make", "--weights", u["root"] / "net.safetensors"],
    "onnx": lambda u: [u["root"] / "net.onnx"],
    "pt2": lambda u: [u["root"] / "net.pt2"],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_repair_own_model_in_its_form(user, form, tmp_path):
    root = user["root"]
    out = tmp_path / "run"
    # 40 validation samples (2.5 points each): the gate's budget must allow one of them
    p = run("repair", *FORMS[form](user), "--data", root / "x.npz", "--evidence", root / "ev.npz", "--pairs", 5,
            "--method", "rectify", "--max-accuracy-drop", 3, "--out", out, "--json", cwd=root)
    res = json.loads(p.stdout)
    res["_out"] = out
    assert res["before"]["asr"] > 0.9
    assert res["after"]["asr"] <= 0.05 and res["after"]["asr_transplant"] <= 0.05, res["after"]
    assert res["after"]["clean_accuracy"] >= res["before"]["clean_accuracy"] - 0.03
    info = json.loads((out / "model.json").read_text())
    assert info["user_data"]["target"] == TARGET          # found from the triggered evidence, not given
    if form == "factory":
        from safetensors.torch import load_file

        net = user["module"].make()
        net.load_state_dict(load_file(str(out / "model.safetensors")))   # same keys as the user's state dict
        net.eval()
        check_written(user, res, lambda a: net(torch.from_numpy(a)).detach().numpy())
    elif form == "onnx":
        ort = pytest.importorskip("onnxruntime")
        import onnx

        sess = ort.InferenceSession(str(out / "model.onnx"))
        assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
        assert [n.name for n in onnx.load(str(out / "model.onnx")).graph.node] == \
            [n.name for n in onnx.load(str(root / "net.onnx")).graph.node]
        check_written(user, res, lambda a: sess.run(None, {"input": a.astype(np.float32)})[0])
    else:
        prog = torch.export.load(str(out / "model.pt2")).module()
        check_written(user, res, lambda a: prog(torch.from_numpy(a)).detach().numpy())
    # the run folder is itself a model: evaluate it with the files it remembers, same numbers
    ev = json.loads(run("evaluate", out, "--json", cwd=root).stdout)["metrics"]
    for k in ("clean_accuracy", "asr", "asr_transplant"):
        assert abs(ev[k] - res["after"][k]) < 1e-6, (k, ev[k], res["after"][k])


def test_weights_only_state_dict_and_list_layers(user):
    root = user["root"]
    p = run("locate", "usernet:make", "--weights", root / "net.pt", "--list-layers", "--json", cwd=root)
    names = {row["name"] for row in json.loads(p.stdout)}
    assert {"conv1", "bn1", "conv2", "fc1", "fc2"} <= names


def test_methods_name_shows_options():
    p = run("methods", "finetune")
    assert "epochs" in p.stdout and "lr" in p.stdout and "default" in p.stdout
    assert_user_error(run("methods", "no-such-method", check=False), "unknown method")


def _bad_files(root: Path, tmp: Path) -> dict[str, Path]:
    z = np.load(root / "ev.npz")
    np.savez(tmp / "wrong_shape.npz", x=np.zeros((20, 1, 12, 12), np.float32), y=np.zeros(20, np.int64))
    np.savez(tmp / "ev_shapes.npz", triggered=z["triggered"][:, :, :7], clean=z["clean"])
    np.savez(tmp / "labels_out.npz", x=np.zeros((20, 1, 8, 8), np.float32), y=np.full(20, 12))
    (tmp / "text.csv").write_text("a,b,label\n1,2,0\n3,x,1\n")
    (tmp / "ok.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp / "bad_keys.pt")
    return {p.stem: p for p in tmp.iterdir()}


def test_bad_input_is_one_line(user, tmp_path):
    root = user["root"]
    f = _bad_files(root, tmp_path)
    own = ["usernet:make", "--weights", root / "net.safetensors"]
    cases = [
        (own + ["--data", f["wrong_shape"], "--evidence", root / "ev.npz"], "does not fit the model"),
        (own + ["--data", root / "x.npz", "--evidence", f["ev_shapes"]], "differ in shape"),
        (own + ["--data", f["labels_out"], "--evidence", root / "ev.npz"], "outside the model's 10 classes"),
        (own + ["--data", f["text"], "--label-column", "label", "--protected", "a"], "column 'b' is not numeric"),
        (own + ["--data", f["ok"], "--label-column", "nope", "--protected", "a"], "no column 'nope'"),
        (["usernet:nothing", "--data", root / "x.npz", "--evidence", root / "ev.npz"], "has no attribute"),
        (["nosuchmodule:make", "--data", root / "x.npz", "--evidence", root / "ev.npz"], "not found"),
        (["usernet:not_a_module", "--data", root / "x.npz", "--evidence", root / "ev.npz"], "not a torch.nn.Module"),
        (["usernet:make", "--weights", f["bad_keys"], "--data", root / "x.npz", "--evidence", root / "ev.npz"],
         "keys do not match"),
        (own + ["--data", root / "x.npz"], "--evidence"),
    ]
    for args, fragment in cases:
        out = tmp_path / "never"
        p = run("repair", *args, "--out", out, cwd=root, check=False)
        assert_user_error(p, fragment)
        assert not out.exists(), args


def test_unsupported_onnx_op_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Einsum", ["input", "input"], ["logits"], equation="bi,bi->bi")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])])
    path = tmp_path / "einsum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int64))
    p = run("repair", path, "--data", tmp_path / "x.npz", "--protected", "x0", "--out", tmp_path / "run", check=False)
    assert_user_error(p, "Einsum")


# ----------------------------------------------------------------------------- the Python API, no subclassing

def test_api_backdoor_from_arrays_and_a_dataset(user):
    import netmend

    z = user["ev"]
    root = user["root"]
    data = np.load(root / "x.npz")
    model = user["module"].make()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(root / "net.safetensors")))
    ds = torch.utils.data.TensorDataset(torch.from_numpy(data["x"]), torch.from_numpy(data["y"]))
    defect = netmend.backdoor(z["triggered"], z["clean"], repair_data=ds, test_data=(data["x_test"], data["y_test"]),
                              pairs=5)
    result = netmend.repair(model, defect, method="rectify", max_accuracy_drop=0.03)
    assert result.accepted, result.gate
    assert defect.target == TARGET
    assert result.before["asr"] > 0.9 and result.after["asr"] <= 0.05


def test_api_fairness_and_wrong_predictions():
    import netmend

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (600, 4), generator=g).float()
    y = (x[:, 0] + x[:, 1] > 4).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    biased = y.clone()
    biased[x[:, 3] >= 3] = 1                       # the protected column decides part of the labels
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), biased).backward()
        opt.step()
    defect = netmend.fairness(x.numpy(), y.numpy(), protected="d", features=["a", "b", "c", "d"], model=model)
    before = defect.metrics(model)
    assert before["discrimination_rate"] > 0.1
    assert defect.describe()["protected"] == ["d"]
    pred = model(x).argmax(1)
    bad = pred != y
    wp = netmend.wrong_predictions(x.numpy(), y.numpy(), evidence=(x[bad][:30], y[bad][:30]), model=model)
    m = wp.metrics(model)
    assert m["evidence_fixed"] == 0.0 and m["n_evidence"] == 30
