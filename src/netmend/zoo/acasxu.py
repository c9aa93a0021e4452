"""ACAS Xu networks: the `acasxu` architecture and loaders for `.nnet` and `.onnx` files.

The model takes NORMALISED inputs (as the property boxes and the ONNX copies do); the `.nnet`
normalisation constants travel in `arch_args` so raw units stay recoverable (`to_normalised`,
`to_raw_outputs`). The ONNX converter is our own (no onnx2torch): it folds each run of affine
ops (MatMul/Gemm/Add/Sub/Mul/Div by constants) into one Linear and refuses any other op.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import NetmendError
from ..registry import ARCHITECTURES, MODEL_FILES

# The normalisation header shared by all 45 ACAS Xu .nnet files; used for ONNX copies, which lack it.
STANDARD_NORMALISATION: dict[str, list[float]] = {
    "input_min": [0.0, -3.141593, -3.141593, 100.0, 0.0],
    "input_max": [60760.0, 3.141593, 3.141593, 1200.0, 1200.0],
    "input_mean": [19791.091, 0.0, 0.0, 650.0, 600.0],
    "input_range": [60261.0, 6.28318530718, 6.28318530718, 1100.0, 1200.0],
    "output_mean": [7.5188840201005975],
    "output_range": [373.94992],
}
ADVISORIES = ["COC", "WL", "WR", "SL", "SR"]


@ARCHITECTURES.register("acasxu", "ACAS Xu ReLU MLP (fc1, relu1, ..., fcN) on normalised inputs; .nnet/.onnx loaders")
def acasxu(in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (50,) * 6, **normalisation: Any) -> nn.Sequential:
    """Linear/ReLU chain; the last layer is linear. `normalisation` (input_min ... output_range) is kept
    as `model.normalisation` for raw-unit conversion, not applied in forward."""
    unknown = set(normalisation) - set(STANDARD_NORMALISATION)
    if unknown:
        raise NetmendError(f"acasxu: unknown argument(s) {sorted(unknown)}")
    sizes = [int(in_shape[0])] + [int(h) for h in hidden] + [int(num_classes)]
    layers: list[tuple[str, nn.Module]] = []
    for i in range(1, len(sizes)):
        layers.append((f"fc{i}", nn.Linear(sizes[i - 1], sizes[i])))
        if i < len(sizes) - 1:
            layers.append((f"relu{i}", nn.ReLU()))
    model = nn.Sequential(OrderedDict(layers))
    model.normalisation = {k: list(map(float, v)) for k, v in normalisation.items()}
    return model


def to_normalised(x_raw: torch.Tensor, norm: dict[str, list[float]] | None = None) -> torch.Tensor:
    """Raw units -> network inputs: (clip(x, min, max) − mean) / range (the .nnet convention)."""
    n = norm or STANDARD_NORMALISATION
    t = lambda k: torch.tensor(n[k][: x_raw.shape[-1]], dtype=x_raw.dtype, device=x_raw.device)  # noqa: E731
    return (torch.minimum(torch.maximum(x_raw, t("input_min")), t("input_max")) - t("input_mean")) / t("input_range")


def to_raw_outputs(y: torch.Tensor, norm: dict[str, list[float]] | None = None) -> torch.Tensor:
    """Network outputs -> raw scores (y·range_out + mean_out); the argmin (advisory) is unchanged."""
    n = norm or STANDARD_NORMALISATION
    return y * n["output_range"][0] + n["output_mean"][0]


def _info(path: Path, sizes: list[int], norm: dict[str, list[float]], fmt: str) -> dict[str, Any]:
    stem = path.stem
    info: dict[str, Any] = {
        "arch": "acasxu",
        "arch_args": {"in_shape": [sizes[0]], "num_classes": sizes[-1], "hidden": sizes[1:-1], **norm},
        "defect": {"kind": "safety"}, "source": str(path), "format": fmt, "name": stem,
        "decision": "argmin", "classes": ADVISORIES if sizes[-1] == 5 else None,
    }
    parts = stem.split("_")
    if stem.startswith("ACASXU_run2a_") and len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
        info["net"] = [int(parts[2]), int(parts[3])]
    return info


# ---------------------------------------------------------------- .nnet

def _numbers(line: str, lineno: int, path: Path, count: int | None = None) -> list[float]:
    fields = [f.strip() for f in line.strip().rstrip(",").split(",")]
    try:
        vals = [float(f) for f in fields]
    except ValueError:
        raise NetmendError(f"{path}: line {lineno}: expected comma-separated numbers, got {line.strip()[:60]!r}") from None
    if count is not None and len(vals) != count:
        raise NetmendError(f"{path}: line {lineno}: expected {count} values, got {len(vals)}")
    return vals


def parse_nnet(path: str | Path) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]], dict[str, list[float]]]:
    """(layer sizes, [(W out×in, b)], normalisation) from a .nnet file; errors name the offending line."""
    path = Path(path)
    if not path.is_file():
        raise NetmendError(f"network file not found: {path}")
    try:
        raw = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise NetmendError(f"{path}: not a text .nnet file") from None
    lines = [(i + 1, s) for i, s in enumerate(raw) if s.strip() and not s.lstrip().startswith("//")]
    it = iter(lines)

    def nxt(what: str) -> tuple[int, str]:
        try:
            return next(it)
        except StopIteration:
            raise NetmendError(f"{path}: file ends early (line {len(raw) + 1}), expected {what}") from None

    ln, s = nxt("the header line numLayers,inputSize,outputSize,maxLayerSize")
    head = _numbers(s, ln, path, 4)
    n_layers, n_in, n_out = (int(v) for v in head[:3])
    if n_layers < 1 or n_in < 1 or n_out < 1 or any(v != int(v) for v in head):
        raise NetmendError(f"{path}: line {ln}: bad header {s.strip()!r}")
    ln, s = nxt("the layer sizes")
    sizes = [int(v) for v in _numbers(s, ln, path, n_layers + 1)]
    if sizes[0] != n_in or sizes[-1] != n_out or min(sizes) < 1:
        raise NetmendError(f"{path}: line {ln}: layer sizes {sizes} disagree with inputSize {n_in} / outputSize {n_out}")
    nxt("the legacy symmetric flag")
    norm = {}
    for key, count in (("input_min", n_in), ("input_max", n_in), ("input_mean", n_in + 1), ("input_range", n_in + 1)):
        ln, s = nxt(key.replace("_", " "))
        norm[key] = _numbers(s, ln, path, count)
    norm["output_mean"] = [norm["input_mean"].pop()]
    norm["output_range"] = [norm["input_range"].pop()]
    layers = []
    for k in range(1, n_layers + 1):
        rows = []
        for r in range(sizes[k]):
            ln, s = nxt(f"weight row {r + 1} of layer {k}")
            rows.append(_numbers(s, ln, path, sizes[k - 1]))
        bias = []
        for r in range(sizes[k]):
            ln, s = nxt(f"bias {r + 1} of layer {k}")
            bias += _numbers(s, ln, path, 1)
        layers.append((torch.tensor(rows, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32)))
    extra = next(it, None)
    if extra is not None:
        raise NetmendError(f"{path}: line {extra[0]}: unexpected content after the last layer")
    for key, vals in norm.items():
        if not all(torch.isfinite(torch.tensor(vals))):
            raise NetmendError(f"{path}: {key.replace('_', ' ')} contains NaN or infinite values")
    for k, (w, b) in enumerate(layers, 1):
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise NetmendError(f"{path}: layer {k} contains NaN or infinite values")
    return sizes, layers, norm


def _model_from_layers(sizes: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], norm: dict) -> nn.Sequential:
    model = acasxu([sizes[0]], sizes[-1], sizes[1:-1], **norm)
    with torch.no_grad():
        for k, (w, b) in enumerate(layers, 1):
            fc = model.get_submodule(f"fc{k}")
            fc.weight.copy_(w)
            fc.bias.copy_(b)
    return model.eval()


def load_nnet(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A .nnet file as (model on normalised inputs, info)."""
    path = Path(path)
    sizes, layers, norm = parse_nnet(path)
    return _model_from_layers(sizes, layers, norm), _info(path, sizes, norm, "nnet")


# ---------------------------------------------------------------- .onnx

SUPPORTED_ONNX_OPS = ("MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Flatten", "Reshape", "Identity")


def _onnx_affine_chain(graph, path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Walk a single-input chain graph, composing affine ops into (A, c) and cutting at each Relu."""
    from onnx import numpy_helper

    consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).to(torch.float64) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = torch.from_numpy(numpy_helper.to_array(node.attribute[0].t).copy()).to(torch.float64)
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise NetmendError(f"{path}: expected one network input, found {len(inputs)}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if not dims or dims[-1] < 1:
        raise NetmendError(f"{path}: the network input needs a fixed feature size (last dimension)")
    n_in = int(dims[-1])   # [5], [1, 5] or [1, 1, 1, 5]: features are the last axis
    cur = inputs[0].name
    a, c = torch.eye(n_in, dtype=torch.float64), torch.zeros(n_in, dtype=torch.float64)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending = False
    for node in graph.node:
        op = node.op_type
        if op == "Constant":
            continue
        if op not in SUPPORTED_ONNX_OPS:
            raise NetmendError(f"{path}: unsupported ONNX op {op!r} (supported: {', '.join(SUPPORTED_ONNX_OPS)})")
        if cur not in node.input:
            raise NetmendError(f"{path}: ONNX node {node.name or op!r} is not part of a single chain (only feed-forward chains are supported)")
        others = [i for i in node.input if i != cur and i]
        attrs = {at.name: at for at in node.attribute}
        if op in ("Flatten", "Reshape", "Identity"):
            pass   # batch × features throughout
        elif op == "Relu":
            if not pending and layers:
                raise NetmendError(f"{path}: two Relu ops without an affine op between them")
            layers.append((a.clone(), c.clone()))
            a, c = torch.eye(a.shape[0], dtype=torch.float64), torch.zeros(a.shape[0], dtype=torch.float64)
            pending = False
        else:
            if op == "Gemm":
                others = others[:1]   # (W, optional C); C is read below
            if len(others) != 1 or others[0] not in consts:
                raise NetmendError(f"{path}: ONNX op {op} must combine the activation with one constant")
            k = consts[others[0]]
            first = node.input[0] == cur
            if op == "MatMul":
                if not first:
                    raise NetmendError(f"{path}: MatMul with the weight on the left is not supported")
                a, c = k.T @ a, k.T @ c
            elif op == "Gemm":
                if not first:
                    raise NetmendError(f"{path}: Gemm with the weight as first operand is not supported")
                if "transA" in attrs and attrs["transA"].i:
                    raise NetmendError(f"{path}: Gemm with transA=1 is not supported")
                alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
                beta = attrs["beta"].f if "beta" in attrs else 1.0
                w = k if ("transB" in attrs and attrs["transB"].i) else k.T   # (out, in)
                a, c = alpha * (w @ a), alpha * (w @ c)
                if len(node.input) > 2 and node.input[2]:
                    c = c + beta * consts[node.input[2]].reshape(-1)
            elif op in ("Add", "Sub"):
                k = k.reshape(-1)
                if op == "Add":
                    c = c + k
                elif first:
                    c = c - k
                else:
                    a, c = -a, k - c
            elif op in ("Mul", "Div"):
                k = k.reshape(-1)
                if op == "Div" and not first:
                    raise NetmendError(f"{path}: division by the activation is not affine")
                f = k if op == "Mul" else 1.0 / k
                a, c = a * f.reshape(-1, 1), c * f
            pending = True
        cur = node.output[0]
    if not pending:
        raise NetmendError(f"{path}: the network must end with an affine layer, not a Relu")
    layers.append((a, c))
    outs = [o.name for o in graph.output]
    if cur not in outs:
        raise NetmendError(f"{path}: graph output {outs} is not the end of the chain")
    return [(w.float(), b.float()) for w, b in layers]


def load_onnx(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """An ONNX feed-forward ReLU network as (model, info); standard ACAS normalisation assumed in info."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise NetmendError(f"network file not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:   # onnx raises DecodeError and friends
        raise NetmendError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    layers = _onnx_affine_chain(proto.graph, path)
    sizes = [layers[0][0].shape[1]] + [w.shape[0] for w, _ in layers]
    norm = {k: list(v) for k, v in STANDARD_NORMALISATION.items()} if sizes[0] == 5 else {}
    return _model_from_layers(sizes, layers, norm), _info(path, sizes, norm, "onnx")


MODEL_FILES.add(".nnet", load_nnet, "ACAS Xu / Reluplex .nnet text network (normalisation in the header)")
MODEL_FILES.add(".onnx", load_onnx, "feed-forward ReLU network in ONNX (MatMul/Gemm/Add/Sub/Mul/Div/Relu/Flatten)")
