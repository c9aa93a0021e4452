"""User model formats: ONNX (our own converter + write-back) and torch.export .pt2 programs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from netmend.errors import NetmendError  # noqa: E402
from netmend.formats.export_model import load_pt2, write_pt2  # noqa: E402
from netmend.formats.onnx_model import load_onnx, onnx_layers, write_onnx  # noqa: E402
from netmend.hooks import weight_layers  # noqa: E402


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)        # residual add
        x = self.gap(self.pool(x)).flatten(1)
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = x.view(x.size(0), -1)          # legacy exporter: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
        return self.fc2(self.act(self.fc1(x)))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    m = TinyCNN()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return MLP().eval()


SHAPES = {"cnn": (3, 8, 8), "mlp": (6,)}
DYNAMIC = {"input": {0: "n"}, "logits": {0: "n"}}


def _export(model, shape, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, *shape),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes=DYNAMIC, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    cnn, mlp = _cnn(), _mlp()
    for name, model, kw in [("cnn_legacy", cnn, {"dynamo": False}),
                            ("cnn_nofold", cnn, {"dynamo": False, "do_constant_folding": False}),
                            ("mlp_legacy", mlp, {"dynamo": False}),
                            ("cnn_dynamo", cnn, {"dynamo": True, "verbose": False}),
                            ("mlp_dynamo", mlp, {"dynamo": True, "verbose": False})]:
        out[name] = d / f"{name}.onnx"
        try:
            _export(model, SHAPES[name.split("_")[0]], out[name], **kw)
        except ImportError:           # the dynamo exporter needs onnxscript
            out[name] = None
    out["models"] = {"cnn": cnn, "mlp": mlp}
    return out


def _file(files, name):
    if files[name] is None:
        pytest.skip(f"{name}: exporter unavailable")
    return files[name]


def _ort(path, x: torch.Tensor, name: str = "input") -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x.numpy()})[0]


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


ALL = ["cnn_legacy", "cnn_nofold", "mlp_legacy", "cnn_dynamo", "mlp_dynamo"]


@pytest.mark.parametrize("name", ALL)
def test_converted_matches_onnxruntime_and_torch(files, name):
    gm, src = load_onnx(_file(files, name))
    assert not gm.training
    assert src.input_name == "input" and src.output_names == ["logits"] and src.input_shape[0] in ("n", -1)
    kind = name.split("_")[0]
    torch.manual_seed(2)
    for batch in (1, 7):
        x = torch.randn(batch, *SHAPES[kind])
        with torch.no_grad():
            y = gm(x)
            ref_torch = files["models"][kind](x)
        assert y.shape == (batch, ref_torch.shape[1])
        assert _rel(y, _ort(files[name], x)) < 1e-4
        assert _rel(y, ref_torch) < 1e-4


def test_module_names_are_the_users(files):
    gm, src = load_onnx(files["cnn_legacy"])       # BN folded into the convs; initializers named onnx::Conv_*
    assert weight_layers(gm) == ["conv1", "conv2", "fc"]
    assert isinstance(gm.get_submodule("conv1"), nn.Conv2d) and isinstance(gm.get_submodule("fc"), nn.Linear)
    layers = onnx_layers(gm)
    assert ("relu", "ReLU", ()) in layers and ("fc", "Linear", (5, 8)) in layers
    kinds = [t for _, t, _ in layers]
    assert kinds.index("Conv2d") < kinds.index("ReLU") < kinds.index("Linear")   # execution order
    assert src.params["fc.weight"] == ("fc.weight", ())

    gm, src = load_onnx(files["cnn_nofold"])       # real BatchNormalization nodes
    names = [n for n, _, _ in onnx_layers(gm)]
    assert names[:3] == ["conv1", "bn1", "relu"]
    assert isinstance(gm.get_submodule("bn2"), nn.BatchNorm2d)
    assert src.params["bn1.running_mean"][0] == "bn1.running_mean"

    if files["cnn_dynamo"] is not None:
        gm, _ = load_onnx(files["cnn_dynamo"])
        assert weight_layers(gm) == ["conv1", "conv2", "fc"]
    gm, _ = load_onnx(files["mlp_legacy"])
    assert [n for n, _, _ in onnx_layers(gm)] == ["fc1", "act", "fc2"]


@pytest.mark.parametrize("name", ["cnn_legacy", "cnn_dynamo", "cnn_nofold"])
def test_write_onnx_patches_only_changed_initializers(files, name, tmp_path):
    path = _file(files, name)
    before = path.read_bytes()
    gm, src = load_onnx(path)
    with torch.no_grad():
        gm.conv1.weight[0, 0, 0, 0] += 0.5
        gm.fc.weight.mul_(1.25)
    out = tmp_path / "repaired.onnx"
    write_onnx(src, gm, out)
    assert path.read_bytes() == before                          # the input file is untouched
    x = torch.randn(7, *SHAPES["cnn"])
    with torch.no_grad():
        y = gm(x)
    assert _rel(_ort(out, x), y) < 1e-4
    assert _rel(_ort(path, x), y) > 1e-3                         # the change matters
    a, b = onnx.load(str(path)), onnx.load(str(out))
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert a.opset_import == b.opset_import and a.producer_name == b.producer_name
    changed = {src.params["conv1.weight"][0], src.params["fc.weight"][0]}
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert ia.keys() == ib.keys()
    for k in ia:
        assert np.array_equal(ia[k], ib[k]) == (k not in changed), k
    gm2, _ = load_onnx(out)                                      # and it converts again
    with torch.no_grad():
        assert _rel(gm2(x), y) < 1e-5


def _save(model_proto, path):
    onnx.checker.check_model(model_proto)
    path.write_bytes(model_proto.SerializeToString())
    return path


def _graph(nodes, inits, inputs=None, outputs=None, opset=17):
    if inputs is None:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None])]
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_gemm_matmul_transforms_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(size=(4, 5)).astype(np.float32),      # MatMul weight: in x out
             "b1": rng.normal(size=(5,)).astype(np.float32),
             "W2": rng.normal(size=(5, 3)).astype(np.float32),      # Gemm transB=0, alpha, beta
             "b2": rng.normal(size=(1, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="/enc/MatMul"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="/enc/Add"),
             helper.make_node("Tanh", ["hb"], ["t"], name="/act/Tanh"),
             helper.make_node("Gemm", ["t", "W2", "b2"], ["y"], name="/head/Gemm", alpha=0.5, beta=2.0)]
    path = _save(_graph(nodes, inits), tmp_path / "m.onnx")
    gm, src = load_onnx(path)
    assert [(n, t) for n, t, _ in onnx_layers(gm)] == [("enc", "Linear"), ("act", "Tanh"), ("head", "Linear")]
    assert src.params["enc.weight"] == ("W1", (("permute", (1, 0)),))
    assert src.params["head.weight"] == ("W2", (("div", 0.5), ("permute", (1, 0))))
    x = torch.randn(7, 4)
    assert _rel(gm(x).detach(), _ort(path, x, "x")) < 1e-5
    with torch.no_grad():
        gm.enc.weight[1, 2] -= 1.0
        gm.head.bias.add_(0.25)
    write_onnx(src, gm, tmp_path / "out.onnx")
    with torch.no_grad():
        assert _rel(_ort(tmp_path / "out.onnx", x, "x"), gm(x)) < 1e-5
    out = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "out.onnx")).graph.initializer}
    assert np.array_equal(out["W2"], inits["W2"])                      # unchanged: bit for bit


def test_shared_initializer_is_split_when_its_users_disagree(tmp_path):
    """The legacy exporter merges equal initializers (zero biases, BN-folded ones): a repair that changes one
    user gets its own copy, read by that node only; node names and graph inputs/outputs stay."""
    w = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="/a/Gemm", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="/relu/Relu"),
             helper.make_node("Gemm", ["r", "W"], ["y"], name="/b/Gemm", transB=1)]
    path = _save(_graph(nodes, {"W": w}), tmp_path / "shared.onnx")
    gm, src = load_onnx(path)
    assert src.shared == {"W": ["a.weight", "b.weight"]}
    with torch.no_grad():
        gm.a.weight.add_(1.0)
    write_onnx(src, gm, tmp_path / "out.onnx")
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.name for n in written.graph.node] == ["/a/Gemm", "/relu/Relu", "/b/Gemm"]
    inits = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    assert np.array_equal(inits["W"], w)                                 # b still reads the original
    assert written.graph.node[0].input[1] != "W" and written.graph.node[2].input[1] == "W"
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert _rel(_ort(tmp_path / "out.onnx", x, "x"), gm(x)) < 1e-5
    with torch.no_grad():
        gm.b.weight.add_(1.0)                                          # consistent again: written in place
    write_onnx(src, gm, tmp_path / "out2.onnx")
    assert len(onnx.load(str(tmp_path / "out2.onnx")).graph.initializer) == 1
    with torch.no_grad():
        assert _rel(_ort(tmp_path / "out2.onnx", x, "x"), gm(x)) < 1e-5


def test_changed_tensor_without_initializer_is_refused(tmp_path):
    w = np.random.default_rng(2).normal(size=(2, 3, 3, 3)).astype(np.float32)
    bias = helper.make_tensor("bias_value", TensorProto.FLOAT, [2], [0.5, -0.5])
    nodes = [helper.make_node("Constant", [], ["b"], value=bias, name="bias_const"),
             helper.make_node("Conv", ["x", "W", "b"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1])]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 5, 5])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 5, 5])
    path = _save(_graph(nodes, {"W": w}, [x_info], [y_info]), tmp_path / "constbias.onnx")
    gm, src = load_onnx(path)
    assert "conv.bias" not in src.params and "conv.bias" in src.unmapped
    with torch.no_grad():
        gm.conv.weight.add_(0.1)
    write_onnx(src, gm, tmp_path / "ok.onnx")                          # the weight has an initializer
    with torch.no_grad():
        gm.conv.bias.add_(0.1)
    _one_line_error(lambda: write_onnx(src, gm, tmp_path / "bad.onnx"), r"'conv\.bias' changed but has no ONNX initializer")
    assert not (tmp_path / "bad.onnx").exists()


def test_fixed_batch_file_runs_any_batch(tmp_path):
    mlp = _mlp()
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mlp, (torch.randn(1, 6),), str(path), dynamo=False, input_names=["input"], output_names=["logits"])
    gm, src = load_onnx(path)
    assert src.fixed_batch == 1 and src.input_shape == (-1, 6)
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert _rel(gm(x), mlp(x)) < 1e-5


def test_external_data_inside_folder_loads_and_writes(files, tmp_path):
    proto = onnx.load(str(files["mlp_legacy"]))
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save_model(proto, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.weights", size_threshold=0)
    gm, src = load_onnx(d / "m.onnx")
    assert src.external_data
    with torch.no_grad():
        gm.fc2.weight.add_(0.1)
    write_onnx(src, gm, tmp_path / "out" / "r.onnx")
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert _rel(_ort(tmp_path / "out" / "r.onnx", x), gm(x)) < 1e-5


def _one_line_error(fn, pattern):
    with pytest.raises(NetmendError, match=pattern) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_onnx_inputs(files, tmp_path):
    txt = tmp_path / "x.onnx"
    txt.write_text("this is not a model\n")
    _one_line_error(lambda: load_onnx(txt), r"x\.onnx: (not a readable ONNX file|not an ONNX model|invalid ONNX)")
    _one_line_error(lambda: load_onnx(tmp_path / "missing.onnx"), "not found")
    trunc = tmp_path / "trunc.onnx"
    data = files["cnn_legacy"].read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: load_onnx(trunc), r"trunc\.onnx: (not a readable ONNX file|invalid ONNX)")

    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4])
    sel = helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])
    scores = np.ones((1, 1, 3), np.float32)
    nms = _graph([helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms")],
                 {"scores": scores}, [boxes], [sel])
    path = _save(nms, tmp_path / "nms.onnx")
    msg = _one_line_error(lambda: load_onnx(path), r"ONNX op 'NonMaxSuppression' \(node 'nms'\) is not supported")
    assert "supported: Conv" in msg

    w = np.ones((3, 4), np.float32)
    w[1, 2] = np.nan
    path = _save(_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"W": w}), tmp_path / "nan.onnx")
    _one_line_error(lambda: load_onnx(path), r"initializer 'W' contains NaN")

    two = _graph([helper.make_node("Add", ["x", "z"], ["y"])], {},
                 [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in ("x", "z")])
    path = _save(two, tmp_path / "two.onnx")
    _one_line_error(lambda: load_onnx(path), r"has 2 inputs \('x', 'z'\)")

    const = helper.make_tensor("c", TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    no_input = _graph([helper.make_node("Constant", [], ["y"], value=const)], {}, [])
    path = _save(no_input, tmp_path / "noin.onnx")
    _one_line_error(lambda: load_onnx(path), r"noin\.onnx: the ONNX graph has no input")

    broken = _graph([helper.make_node("Relu", ["nowhere"], ["y"])], {})
    path = tmp_path / "broken.onnx"
    path.write_bytes(broken.SerializeToString())
    _one_line_error(lambda: load_onnx(path), r"broken\.onnx: invalid ONNX model \(onnx\.checker: ")

    # external data that points outside the model's folder
    inner = tmp_path / "models"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones((3, 4), np.float32).tobytes())
    model = _graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"W": np.ones((3, 4), np.float32)})
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "48")):
        e = t.external_data.add()
        e.key, e.value = k, v
    (inner / "ext.onnx").write_bytes(model.SerializeToString())
    _one_line_error(lambda: load_onnx(inner / "ext.onnx"), r"'\.\./secret\.bin', outside the model's folder")


# ------------------------------------------------------------------ torch.export .pt2

@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt2")
    out = {}
    for kind, model in (("cnn", _cnn()), ("mlp", _mlp())):
        ep = torch.export.export(model, (torch.randn(2, *SHAPES[kind]),))     # static batch of 2
        out[kind] = d / f"{kind}.pt2"
        torch.export.save(ep, str(out[kind]))
        out[kind + "_model"] = model
    return out


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_pt2_loads_with_user_names_and_any_batch(pt2, kind):
    gm, src = load_pt2(pt2[kind])
    model = pt2[kind + "_model"]
    assert set(src.state_dict_keys) == set(model.state_dict())
    assert set(gm.state_dict()) == set(model.state_dict())
    assert src.input_shape == (-1, *SHAPES[kind]) and src.example_batch == 2
    if kind == "cnn":
        assert weight_layers(gm) == ["conv1", "conv2", "fc"]
        assert isinstance(gm.conv1, nn.Conv2d) and isinstance(gm.fc, nn.Linear) and isinstance(gm.bn1, nn.BatchNorm2d)
        names = [n for n, _, _ in onnx_layers(gm)]
        assert names[:3] == ["conv1", "bn1", "relu"] and names[-1] == "fc"
    else:
        assert [(n, t) for n, t, _ in onnx_layers(gm)] == [("fc1", "Linear"), ("act", "ReLU"), ("fc2", "Linear")]
    for batch in (1, 7):
        x = torch.randn(batch, *SHAPES[kind])
        with torch.no_grad():
            assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_pt2_write_round_trip(pt2, tmp_path):
    before = pt2["cnn"].read_bytes()
    gm, src = load_pt2(pt2["cnn"])
    with torch.no_grad():
        gm.conv1.weight[0].mul_(-1.0)
        gm.fc.weight.add_(0.3)
    out = tmp_path / "repaired.pt2"
    write_pt2(src, gm, out)
    assert pt2["cnn"].read_bytes() == before
    x = torch.randn(2, *SHAPES["cnn"])          # the reloaded program keeps its batch guard
    with torch.no_grad():
        y = gm(x)
        assert not torch.allclose(y, pt2["cnn_model"](x), atol=1e-3)
        assert torch.allclose(torch.export.load(str(out)).module()(x), y, rtol=1e-5, atol=1e-6)
    gm2, _ = load_pt2(out)
    x = torch.randn(5, *SHAPES["cnn"])
    with torch.no_grad():
        assert torch.allclose(gm2(x), gm(x), rtol=1e-5, atol=1e-6)


def test_bad_pt2_inputs(pt2, tmp_path):
    _one_line_error(lambda: load_pt2(tmp_path / "nope.pt2"), "not found")
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(pt2["mlp"].read_bytes()[:300])
    _one_line_error(lambda: load_pt2(bad), r"bad\.pt2: not a torch\.export \.pt2 archive")
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x + torch.zeros(2, 1)          # the example's batch size, baked into the program

    ep = torch.export.export(FixedBatch(), (torch.randn(2, 3),))
    torch.export.save(ep, str(tmp_path / "fixed.pt2"))
    _one_line_error(lambda: load_pt2(tmp_path / "fixed.pt2"), r"fixed\.pt2: the exported program only runs with batch size 2")
    other = tmp_path / "weights.pt2"
    torch.save({"a": torch.ones(2)}, other)                  # a zip, but not an ExportedProgram
    _one_line_error(lambda: load_pt2(other), r"weights\.pt2: cannot load the exported program")
