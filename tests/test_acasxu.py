"""ACAS Xu loaders: .nnet parser, our own ONNX converter, the `acasxu` architecture, bad files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from netmend.errors import NetmendError
from netmend.modelio import load_model_folder, save_model_folder
from netmend.registry import ARCHITECTURES, MODEL_FILES
from netmend.zoo.acasxu import STANDARD_NORMALISATION, load_nnet, load_onnx, to_normalised, to_raw_outputs

ACAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "acasxu"
needs_acas = pytest.mark.skipif(not (ACAS / "nnet").is_dir(), reason="ACAS Xu files not found under ../shared/data/acasxu")


def _nnet_text(sizes=(2, 3, 2)) -> list[str]:
    """A tiny valid .nnet file (2 inputs, one hidden layer of 3, 2 outputs) as lines."""
    lines = ["// tiny test net", f"{len(sizes) - 1},{sizes[0]},{sizes[-1]},{max(sizes)},", ",".join(map(str, sizes)) + ",", "0,",
             "0.0,0.0,", "1.0,1.0,", "0.5,0.5,0.0,", "1.0,1.0,1.0,"]
    for k in range(1, len(sizes)):
        lines += [",".join(f"{0.1 * (r + c + 1):.2f}" for c in range(sizes[k - 1])) + "," for r in range(sizes[k])]
        lines += [f"{0.01 * r}," for r in range(sizes[k])]
    return lines


def _write(tmp_path, lines, name="net.nnet") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_registered():
    assert ".nnet" in MODEL_FILES and ".onnx" in MODEL_FILES and "acasxu" in ARCHITECTURES


def test_tiny_nnet_parses_and_computes(tmp_path):
    model, info = load_nnet(_write(tmp_path, _nnet_text()))
    assert [n for n, _ in model.named_children()] == ["fc1", "relu1", "fc2"]
    x = torch.tensor([[0.3, -0.2]])
    w1 = torch.tensor([[0.1, 0.2], [0.2, 0.3], [0.3, 0.4]])
    h = torch.relu(x @ w1.T + torch.tensor([0.0, 0.01, 0.02]))
    w2 = torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.3, 0.4]])
    torch.testing.assert_close(model(x), h @ w2.T + torch.tensor([0.0, 0.01]))
    assert info["arch"] == "acasxu" and info["defect"] == {"kind": "safety"} and info["source"].endswith("net.nnet")
    assert info["arch_args"]["output_mean"] == [0.0] and info["arch_args"]["input_mean"] == [0.5, 0.5]


@pytest.mark.parametrize("line, text, expect", [
    (9, "0.1,abc,", "line 9"),          # first weight row of layer 1 (after 1 comment + 7 header lines)
    (9, "0.1,", "line 9: expected 2 values"),
    (2, "1,2,", "line 2: expected 4 values"),
])
def test_malformed_nnet_names_the_line(tmp_path, line, text, expect):
    lines = _nnet_text()
    lines[line - 1] = text
    with pytest.raises(NetmendError, match=expect) as exc:
        load_nnet(_write(tmp_path, lines))
    assert "\n" not in str(exc.value)


def test_truncated_and_trailing_nnet(tmp_path):
    with pytest.raises(NetmendError, match="ends early"):
        load_nnet(_write(tmp_path, _nnet_text()[:-2]))
    with pytest.raises(NetmendError, match="unexpected content"):
        load_nnet(_write(tmp_path, _nnet_text() + ["1.0,"]))
    with pytest.raises(NetmendError, match="not found"):
        load_nnet(tmp_path / "missing.nnet")


def test_model_folder_roundtrip(tmp_path):
    model, info = load_nnet(_write(tmp_path, _nnet_text()))
    save_model_folder(tmp_path / "out", model, info)
    again, info2 = load_model_folder(tmp_path / "out")
    x = torch.randn(16, 2)
    torch.testing.assert_close(again(x), model(x))
    assert again.normalisation["input_mean"] == [0.5, 0.5]


def _onnx_file(tmp_path, op="Relu"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    w2 = torch.randn(4, 2, generator=g)
    inits = [numpy_helper.from_array(w1.numpy(), "W1"), numpy_helper.from_array(b1.numpy(), "B1"),
             numpy_helper.from_array(w2.numpy(), "W2"), numpy_helper.from_array(torch.tensor([2.0]).numpy(), "two")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1), helper.make_node(op, ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m"]), helper.make_node("Div", ["m", "two"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    p = tmp_path / f"net_{op}.onnx"
    onnx.save(helper.make_model(graph), str(p))
    return p, (w1, b1, w2)


def test_onnx_converter_gemm_div(tmp_path):
    p, (w1, b1, w2) = _onnx_file(tmp_path)
    model, info = load_onnx(p)
    x = torch.randn(8, 3)
    torch.testing.assert_close(model(x), torch.relu(x @ w1.T + b1) @ w2 / 2, atol=1e-5, rtol=1e-5)
    assert info["arch_args"]["hidden"] == [4]


def test_onnx_unsupported_op_named(tmp_path):
    p, _ = _onnx_file(tmp_path, op="Sigmoid")
    with pytest.raises(NetmendError, match="unsupported ONNX op 'Sigmoid'"):
        load_onnx(p)
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"not an onnx file at all")
    with pytest.raises(NetmendError, match="not a readable ONNX"):
        load_onnx(bad)


def test_normalisation_helpers():
    raw = torch.tensor([[70000.0, 0.0, 3.141593, 650.0, 600.0]])   # rho above the max gets clipped
    x = to_normalised(raw)
    assert abs(float(x[0, 0]) - (60760.0 - 19791.091) / 60261.0) < 1e-6 and abs(float(x[0, 2]) - 0.5) < 1e-6
    assert abs(float(to_raw_outputs(torch.tensor(0.0))) - STANDARD_NORMALISATION["output_mean"][0]) < 1e-5


def _nnet_matches_onnx(every: int):
    x = torch.rand(512, 5, generator=torch.Generator().manual_seed(0)) - 0.5
    files = sorted((ACAS / "nnet").glob("*.nnet"))
    assert len(files) == 45
    for f in files[::every]:
        a, info = load_nnet(f)
        b, _ = load_onnx(ACAS / "onnx" / (f.stem + ".onnx"))
        with torch.no_grad():
            assert (a(x) - b(x)).abs().max() < 1e-5, f.name
        assert info["arch_args"]["hidden"] == [50] * 6


@needs_acas
def test_sample_of_nnet_match_onnx():
    """The .nnet parser and the ONNX converter agree to 1e-5 on random normalised inputs (every 7th net)."""
    _nnet_matches_onnx(7)


@needs_acas
@pytest.mark.slow
def test_all_45_nnet_match_onnx():
    _nnet_matches_onnx(1)


@needs_acas
def test_onnx_reference_evaluator_agrees():
    """Independent check of our converter against onnx's own reference evaluator (N2,9)."""
    from onnx.reference import ReferenceEvaluator

    path = ACAS / "onnx" / "ACASXU_run2a_2_9_batch_2000.onnx"
    model, _ = load_onnx(path)
    ref = ReferenceEvaluator(str(path))
    x = torch.rand(20, 5, generator=torch.Generator().manual_seed(1)) - 0.5
    want = torch.cat([torch.from_numpy(ref.run(None, {"input": xi.numpy().reshape(1, 1, 1, 5)})[0]) for xi in x])
    with torch.no_grad():
        assert (model(x) - want).abs().max() < 1e-5
