"""ONNX classifiers as editable PyTorch modules, and repaired weights written back as ONNX.

`load_onnx` is our own converter (no onnx2torch, nothing that pulls torchvision): it builds a
`torch.fx.Graph` directly, one node per ONNX node in the file's topological order. Weight ops
become real modules (`nn.Conv2d`, `nn.Linear`, `nn.BatchNorm2d`, ...), activations become
activation modules where torch has one, everything else is a small function. Constants are
folded at load time; shape arithmetic on the live input (Shape -> Gather -> Concat -> Reshape)
stays in the graph, so any batch size works.

Every parameter/buffer that came from an ONNX initializer is recorded in `OnnxSource.params`
as `name -> (initializer, transform)`, where the transform is a tuple of steps that turn the
tensor back into the initializer. `write_onnx` patches only the initializers whose tensors
changed into the ORIGINAL file (node names, inputs/outputs, opset, metadata stay as they were).
"""
from __future__ import annotations

import ast
import hashlib
import keyword
import math
import operator
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..edit import atomic_write
from ..errors import NetmendError, first_line

# Transform steps, applied in order to a converted tensor to get the ONNX initializer back:
#   ("permute", perm)              init = t.permute(perm)
#   ("reshape", to_shape, from_shape)  init = t.reshape(to_shape)   (t has from_shape)
#   ("div", a)                     init = t / a          (Gemm alpha / beta folded into a Linear)
# The empty tuple is the identity.
Transform = tuple


@dataclass
class OnnxSource:
    """Where a converted model came from, and how to put its tensors back."""

    path: Path
    input_name: str
    input_shape: tuple            # batch dim: -1 or the symbolic name; other dims int or symbolic name
    output_names: list[str]       # [0] is the converted model's output; the rest are recorded only
    opset: int
    params: dict[str, tuple[str, Transform]] = field(default_factory=dict)
    input_dtype: str = "float32"
    fixed_batch: int | None = None        # the file's batch size, when it was not symbolic
    external_data: bool = False
    sha256: str = ""
    shared: dict[str, list[str]] = field(default_factory=dict)   # initializer -> tensors (>1)
    nodes: dict[str, int] = field(default_factory=dict)          # tensor -> index of the ONNX node it came in with
    folded: set[str] = field(default_factory=set)   # initializers also folded into other constants
    unmapped: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # originals, no initializer

    @property
    def output_name(self) -> str:
        return self.output_names[0]

    @property
    def extra_outputs(self) -> list[str]:
        return self.output_names[1:]


# ------------------------------------------------------------------ transforms

def to_initializer(t: torch.Tensor, transform: Transform) -> torch.Tensor:
    """The initializer value a converted tensor stands for."""
    for step in transform:
        if step[0] == "permute":
            t = t.permute(step[1])
        elif step[0] == "reshape":
            t = t.reshape(step[1])
        elif step[0] == "div":
            t = t / step[1]
        else:  # pragma: no cover - steps are built here only
            raise ValueError(f"unknown transform step {step!r}")
    return t.contiguous()


def from_initializer(t: torch.Tensor, transform: Transform) -> torch.Tensor:
    """The converted tensor for an initializer value (the arithmetic load_onnx did)."""
    for step in reversed(transform):
        if step[0] == "permute":
            t = t.permute(tuple(int(i) for i in np.argsort(step[1])))
        elif step[0] == "reshape":
            t = t.reshape(step[2])
        elif step[0] == "div":
            t = t * step[1]
        else:  # pragma: no cover
            raise ValueError(f"unknown transform step {step!r}")
    return t.contiguous()


# ------------------------------------------------------------------ runtime functions (called by the fx graph)

def _ints(v) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    if isinstance(v, (list, tuple)):
        return [int(i) for i in v]
    return [int(v)]


def _floats(v) -> list[float]:
    if isinstance(v, torch.Tensor):
        return [float(i) for i in v.reshape(-1).tolist()]
    if isinstance(v, (list, tuple)):
        return [float(i) for i in v]
    return [float(v)]


def _as_tensor(v, like: torch.Tensor | None = None, dtype=torch.int64) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    return torch.as_tensor(v, dtype=dtype, device=like.device if like is not None else None)


def _op_shape(x, start=0, end=None):
    return torch.tensor(tuple(x.shape)[start:end], dtype=torch.int64, device=x.device)


def _op_size(x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def _op_reshape(x, shape, allowzero=0):
    s = _ints(shape)
    if not allowzero:
        s = [x.shape[i] if d == 0 else d for i, d in enumerate(s)]
    return x.reshape(s)


def _op_flatten(x, axis=1):
    a = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(math.prod(x.shape[:a])), int(math.prod(x.shape[a:])))


def _op_transpose(x, perm=None):
    return x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))


def _op_squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    axes = _ints(axes)
    return x.squeeze(tuple(axes)) if axes else x


def _op_unsqueeze(x, axes):
    axes = _ints(axes)
    r = x.dim() + len(axes)
    for a in sorted(a + r if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def _op_concat(axis, *xs):
    ref = next((x for x in xs if isinstance(x, torch.Tensor)), None)
    return torch.cat([_as_tensor(x, ref) for x in xs], dim=axis)


def _op_gather(x, idx, axis=0):
    idx = _as_tensor(idx, x).long()
    a = axis + x.dim() if axis < 0 else axis
    idx = torch.where(idx < 0, idx + x.shape[a], idx)
    out = x.index_select(a, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:a]) + tuple(idx.shape) + tuple(x.shape[a + 1:]))


def _op_slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + x.dim() if a < 0 else a
        n = x.shape[a]
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            index[a] = slice(min(max(s, 0), n), min(max(e, 0), n), st)
        elif st < 0:
            s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
            x = x.index_select(a, torch.arange(s, e, st, device=x.device))
        else:
            raise ValueError("Slice step 0")
    return x[tuple(index)]


def _op_cast(x, dtype):
    return x.to(dtype)


def _op_cast_like(x, other):
    return x.to(other.dtype)


def _op_div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _op_pow(a, b):
    return torch.pow(a, b).to(a.dtype)


def _op_mod(a, b, fmod=0):
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _op_variadic(kind, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = {"max": torch.maximum, "min": torch.minimum}.get(kind, torch.add)(out, x)
    return out / len(xs) if kind == "mean" else out


def _op_reduce(x, axes=None, keepdims=1, noop=0, kind="mean"):
    axes = _ints(axes) if axes is not None else []
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    keep = bool(keepdims)
    if kind == "mean":
        return torch.mean(x, dim=axes, keepdim=keep)
    if kind == "sum":
        return torch.sum(x, dim=axes, keepdim=keep)
    if kind == "max":
        return torch.amax(x, dim=axes, keepdim=keep)
    if kind == "min":
        return torch.amin(x, dim=axes, keepdim=keep)
    if kind == "l2":
        return torch.linalg.vector_norm(x, 2, dim=axes, keepdim=keep)
    if kind == "l1":
        return torch.linalg.vector_norm(x, 1, dim=axes, keepdim=keep)
    if kind == "sumsquare":
        return torch.sum(x * x, dim=axes, keepdim=keep)
    if kind == "logsumexp":
        return torch.logsumexp(x, dim=axes, keepdim=keep)
    if kind == "prod":
        for a in sorted((a + x.dim() if a < 0 else a for a in axes), reverse=True):
            x = torch.prod(x, dim=a, keepdim=keep)
        return x
    raise ValueError(kind)


def _op_arg(x, axis=0, keepdims=1, last=0, kind="max"):
    fn = torch.argmax if kind == "max" else torch.argmin
    if last:
        n = x.shape[axis]
        return (n - 1) - fn(x.flip(axis), dim=axis, keepdim=bool(keepdims))
    return fn(x, dim=axis, keepdim=bool(keepdims))


def _op_pad(x, pads, value=0.0, axes=None, mode="constant"):
    pads = _ints(pads)
    r = x.dim()
    axes = list(range(r)) if axes is None else [a + r if a < 0 else a for a in _ints(axes)]
    k = len(axes)
    begin, end = [0] * r, [0] * r
    for a, b, e in zip(axes, pads[:k], pads[k:]):
        begin[a], end[a] = b, e
    tp: list[int] = []
    for d in reversed(range(r)):
        tp += [begin[d], end[d]]
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]
    if mode == "constant":
        v = float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) and value.numel() else float(value or 0.0)
        return F.pad(x, tp, value=v)
    return F.pad(x, tp, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _op_expand(x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _op_tile(x, repeats):
    return x.repeat(_ints(repeats))


def _op_constant_of_shape(shape, value, dtype):
    dev = shape.device if isinstance(shape, torch.Tensor) else None
    return torch.full(_ints(shape), value, dtype=dtype, device=dev)


def _op_range(start, limit, delta):
    s = start.item() if isinstance(start, torch.Tensor) else start
    dtype = start.dtype if isinstance(start, torch.Tensor) else None
    lim = limit.item() if isinstance(limit, torch.Tensor) else limit
    d = delta.item() if isinstance(delta, torch.Tensor) else delta
    dev = start.device if isinstance(start, torch.Tensor) else None
    return torch.arange(s, lim, d, dtype=dtype, device=dev)


def _op_split(x, split, axis, n_out):
    if split is not None:
        return tuple(torch.split(x, _ints(split), dim=axis))
    size = x.shape[axis]
    return tuple(torch.split(x, -(-size // n_out), dim=axis))


def _op_where(c, a, b):
    return torch.where(c.bool(), a, b)


def _op_dropout(x):
    return x, torch.ones_like(x, dtype=torch.bool)


def _op_gemm(a, b, c=None, alpha=1.0, beta=1.0, trans_a=0, trans_b=0):
    a = a.transpose(0, 1) if trans_a else a
    b = b.transpose(0, 1) if trans_b else b
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _op_conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return fn(x, w, b, stride, padding, dilation, groups)


def _op_batch_norm(x, scale, bias, mean, var, eps):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def _op_layer_norm(x, scale, bias, axis, eps):
    a = axis + x.dim() if axis < 0 else axis
    return F.layer_norm(x, tuple(x.shape[a:]), scale.expand(x.shape[a:]) if scale is not None else None,
                        bias.expand(x.shape[a:]) if bias is not None else None, eps)


def _op_instance_norm(x, scale, bias, eps):
    return F.instance_norm(x, weight=scale, bias=bias, eps=eps)


def _op_softmax_2d(x, axis, log=False):
    """Softmax for opset < 13: flatten to 2-D at `axis`, normalise each row."""
    a = axis + x.dim() if axis < 0 else axis
    flat = x.reshape(int(math.prod(x.shape[:a])), -1)
    y = torch.log_softmax(flat, dim=1) if log else torch.softmax(flat, dim=1)
    return y.reshape(x.shape)


def _op_hard_sigmoid(x, alpha, beta):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _op_selu(x, alpha, gamma):
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1.0))


def _op_prelu(x, slope):
    return torch.where(x < 0, x * slope, x)


def _op_clip(x, lo=None, hi=None):
    lo = lo.item() if isinstance(lo, torch.Tensor) else lo
    hi = hi.item() if isinstance(hi, torch.Tensor) else hi
    return torch.clamp(x, lo, hi)


def _op_global_pool(x, kind="avg"):
    dims = tuple(range(2, x.dim()))
    return x.mean(dim=dims, keepdim=True) if kind == "avg" else x.amax(dim=dims, keepdim=True)


def _op_resize(x, scales=None, sizes=None, mode="nearest", align_corners=None):
    if sizes is not None and len(_ints(sizes)):
        return F.interpolate(x, size=_ints(sizes)[2:], mode=mode, align_corners=align_corners)
    return F.interpolate(x, scale_factor=_floats(scales)[2:], mode=mode, align_corners=align_corners)


def _op_pool_pad(x, pads, value):
    return F.pad(x, pads, value=value)


# ------------------------------------------------------------------ modules without an exact nn equivalent

class OnnxFlatten(nn.Flatten):
    """ONNX Flatten: always 2-D, (prod(shape[:axis]), prod(shape[axis:]))."""

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _op_flatten(x, self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class OnnxBatchNorm(nn.BatchNorm2d):
    """BatchNormalization whose input rank the shape inference could not tell."""

    def _check_input_dim(self, input):  # noqa: D401 - any rank >= 2 is fine for ONNX BN
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}D input)")


# ------------------------------------------------------------------ naming

_RESERVED: set[str] | None = None


def _reserved() -> set[str]:
    global _RESERVED
    if _RESERVED is None:
        gm = fx.GraphModule(nn.Module(), fx.Graph())
        _RESERVED = set(dir(gm)) | set(dir(nn.Module())) | {"graph", "code", "meta", "forward"}
    return _RESERVED


def _clean_component(c: str) -> str:
    c = re.sub(r"\W", "_", c)
    if not c:
        c = "_"
    if c[0].isdigit() and not c.isdigit():
        c = "_" + c
    if keyword.iskeyword(c) or c in _reserved():
        c = c + "_"
    return c


class ModulePaths:
    """Unique dotted paths for modules and flat names for root buffers: no path may be taken twice,
    no leaf may get children, and no component may shadow an nn.Module / GraphModule attribute."""

    def __init__(self, taken: set[str] | None = None, leaves: set[str] | None = None):
        self.taken: set[str] = set(taken or ())     # every registered path and every container path
        self.leaves: set[str] = set(leaves or ())   # modules and tensors: nothing may go below them

    def _ok(self, path: str) -> bool:
        if path in self.taken:
            return False
        parts = path.split(".")
        return not any(".".join(parts[:i]) in self.leaves for i in range(1, len(parts)))

    def free(self, want: str) -> bool:
        """Whether `want` would be claimed unchanged."""
        path = ".".join(_clean_component(p) for p in want.split(".") if p != "")
        return bool(path) and self._ok(path)

    def claim(self, want: str, fallback: str = "module") -> str:
        parts = [_clean_component(p) for p in want.split(".") if p != ""] or [_clean_component(fallback)]
        path = ".".join(parts)
        if not self._ok(path) and any(".".join(parts[:i]) in self.leaves for i in range(1, len(parts))):
            path = _clean_component("_".join(parts))     # a prefix is a leaf: flatten
        base, k = path, 0
        while not self._ok(path):
            k += 1
            path = f"{base}_{k}"
        self.taken.add(path)
        self.leaves.add(path)
        parts = path.split(".")
        for i in range(1, len(parts)):
            self.taken.add(".".join(parts[:i]))
        return path


_TORCH_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\.(weight|bias)$")


def _torch_owner(name: str | None, kind: str = "weight") -> str | None:
    """`layer1.0.conv1` for an initializer called `layer1.0.conv1.weight`, else None."""
    if name and _TORCH_PARAM.match(name) and name.endswith("." + kind):
        return name[: -len(kind) - 1]
    return None


def _strip_num(s: str) -> str:
    return re.sub(r"_\d+$", "", s) or s


def _scope_name(node, leafy: bool) -> str | None:
    """A module path from the exporter's naming: dynamo name_scopes metadata, legacy `/a/a.0/relu/Relu`
    node names, or the plain node name. `leafy`: the node becomes a module of its own."""
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            scopes = [s for s in ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]) if s != ""]
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            scopes, classes = [], []
        if len(scopes) >= 2:
            owner = scopes[-2]
            cls = classes[-2] if len(classes) >= 2 else ""
            if cls.startswith("torch.nn.modules.") and ".container." not in cls:
                return owner
            return f"{owner}.{_strip_num(scopes[-1])}" if leafy else owner
        if len(scopes) == 1:
            return scopes[0]
    name = node.name or ""
    if "/" in name:
        comps = [c for c in name.split("/") if c]
        if comps and re.fullmatch(rf"{re.escape(node.op_type)}(_\d+)?", comps[-1]):
            comps = comps[:-1]
        path = ""
        for c in comps:
            path = c if (path and c.startswith(path + ".")) or not path else f"{path}.{c}"
        return path or None
    if name.startswith("node_"):
        name = name[5:]
    if not name or re.fullmatch(rf"{re.escape(node.op_type)}(_\d+)?", name):
        return None
    return name


# ------------------------------------------------------------------ the converter

@dataclass
class _Const:
    """A value known at conversion time; `origin` = (initializer, transform) when it is an exact
    layout-only copy of one."""

    t: torch.Tensor
    origin: tuple[str, Transform] | None = None
    name: str | None = None       # the ONNX value it was first bound to (names its buffer)


@dataclass
class _Deferred:
    """A MatMul by a constant, waiting to see whether an Add of a bias follows."""

    x: Any
    w: _Const
    node: Any


_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.int32, 13: torch.int64, 16: torch.bfloat16}

_ACTIVATION_MODULES: dict[str, Callable[[dict], nn.Module]] = {
    "Relu": lambda a: nn.ReLU(),
    "LeakyRelu": lambda a: nn.LeakyReLU(a.get("alpha", 0.01)),
    "Sigmoid": lambda a: nn.Sigmoid(),
    "Tanh": lambda a: nn.Tanh(),
    "Elu": lambda a: nn.ELU(a.get("alpha", 1.0)),
    "Gelu": lambda a: nn.GELU(approximate=a.get("approximate", "none")),
    "HardSwish": lambda a: nn.Hardswish(),
    "Softplus": lambda a: nn.Softplus(),
    "Softsign": lambda a: nn.Softsign(),
    "Mish": lambda a: nn.Mish(),
}

_UNARY: dict[str, Callable] = {
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Exp": torch.exp, "Log": torch.log,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
    "IsNaN": torch.isnan,
}

_BINARY: dict[str, Callable] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _op_div, "Pow": _op_pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}

_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
           "ReduceProd": "prod", "ReduceL1": "l1", "ReduceL2": "l2", "ReduceSumSquare": "sumsquare",
           "ReduceLogSumExp": "logsumexp"}

_LAYOUT_OPS = {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


class _Converter:
    def __init__(self, proto, path: Path, opset: int, shapes: dict[str, list]):
        from onnx import numpy_helper

        self.proto = proto
        self.path = path
        self.opset = opset
        self.shapes = shapes
        self.dtypes: dict[str, int] = {}
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.paths = ModulePaths()
        self.env: dict[str, Any] = {}
        self.origin: dict[int, tuple[str, Transform]] = {}   # id(param/buffer) -> mapping
        self.node_of: dict[int, int] = {}     # id(param/buffer) -> index of the ONNX node being converted then
        self.current = -1
        self.used: set[int] = set()                          # ids of tensors already wrapped
        self.buffer_nodes: dict[int, fx.Node] = {}
        self.folded: set[str] = set()
        self.fixed_batch: int | None = None
        g = proto.graph
        for init in g.initializer:
            try:
                arr = numpy_helper.to_array(init)
                t = torch.from_numpy(np.array(arr, copy=True))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise NetmendError(f"{path}: initializer {init.name!r} has a data type netmend cannot read ({exc})") from None
            self.env[init.name] = _Const(t, (init.name, ()), init.name)
        self.consumers: dict[str, list] = {}
        for node in g.node:
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.graph_outputs = {o.name for o in g.output}

    # ---- helpers
    def fail(self, node, why: str) -> NetmendError:
        return NetmendError(f"{self.path}: ONNX op {node.op_type!r} (node {node.name!r}): {why}")

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return len(s) if s is not None else None

    def value(self, name: str, raw: bool = False):
        if not name:
            return None
        if name not in self.env:
            raise NetmendError(f"{self.path}: ONNX value {name!r} is used before it is produced (graph not in topological order)")
        v = self.env[name]
        if isinstance(v, _Deferred) and not raw:
            v = self.env[name] = self.linear(v, None)
        return v

    def tensor_arg(self, v, hint: str = "const"):
        """An fx-usable argument: runtime nodes pass through, constants become root buffers."""
        if not isinstance(v, _Const):
            return v
        key = id(v)
        if key not in self.buffer_nodes:
            if v.origin is not None and v.origin[1] == () and _torch_like_name(v.origin[0]):
                want = v.origin[0].replace(".", "_")
            else:
                want = "const_" + (re.sub(r"\W", "_", v.name).strip("_") if v.name else hint)
            name = self.paths.claim(want.replace(".", "_"), "const")
            t = v.t if id(v.t) not in self.used else v.t.clone()
            self.used.add(id(t))
            self.root.register_buffer(name, t)
            if v.origin is not None:
                self.origin[id(t)] = v.origin
                self.node_of[id(t)] = self.current
            self.buffer_nodes[key] = self.graph.get_attr(name)
        return self.buffer_nodes[key]

    def static(self, v, limit: int = 1 << 16):
        """A constant argument as a Python list / number (baked into the graph code), or a runtime value."""
        if isinstance(v, _Const) and v.t.numel() <= limit:
            return v.t.tolist()
        return v

    def param(self, c: _Const, steps: Transform = ()) -> nn.Parameter:
        """A Parameter for a constant (`steps`: tensor -> constant), recording its initializer mapping."""
        t = from_initializer(c.t, steps) if steps else c.t.contiguous()
        if id(t) in self.used:
            t = t.clone()
        self.used.add(id(t))
        p = nn.Parameter(t, requires_grad=t.is_floating_point())
        if c.origin is not None:
            self.origin[id(p)] = (c.origin[0], tuple(steps) + tuple(c.origin[1]))
            self.node_of[id(p)] = self.current
        return p

    def buffer_tensor(self, c: _Const) -> torch.Tensor:
        t = c.t.clone() if id(c.t) in self.used else c.t
        self.used.add(id(t))
        if c.origin is not None:
            self.origin[id(t)] = c.origin
            self.node_of[id(t)] = self.current
        return t

    def add_module(self, want, fallback: str, module: nn.Module) -> str:
        """Register `module` under the first free name among `want` (a name or a list of candidates)."""
        cands = [w for w in (want if isinstance(want, (list, tuple)) else [want]) if w]
        free = [w for w in cands if self.paths.free(w)]
        name = self.paths.claim((free or cands or [fallback])[0], fallback)
        parts = name.split(".")
        parent = self.root
        for p in parts[:-1]:
            if p not in parent._modules:
                parent.add_module(p, nn.Module())
            parent = parent._modules[p]
        parent.add_module(parts[-1], module)
        return name

    def call_module(self, want, fallback, module, *args):
        return self.graph.call_module(self.add_module(want, fallback, module), tuple(args))

    def call(self, fn, *args, n_out: int = 1, reads_values: bool = True, hint: str = "const", **kwargs):
        """Emit fn(*args) — or evaluate it now when every tensor argument is a constant."""
        def runtime(a):
            return isinstance(a, fx.Node) or (isinstance(a, (list, tuple)) and any(runtime(b) for b in a))

        if not any(runtime(a) for a in args) and not any(runtime(a) for a in kwargs.values()):
            unwrap = lambda a: a.t if isinstance(a, _Const) else ([unwrap(b) for b in a] if isinstance(a, list) else a)  # noqa: E731
            if reads_values:
                for a in list(args) + list(kwargs.values()):
                    for c in (a if isinstance(a, list) else [a]):
                        if isinstance(c, _Const) and c.origin is not None:
                            self.folded.add(c.origin[0])
            with torch.no_grad():
                out = fn(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()})
            if n_out == 1 and not isinstance(out, tuple):
                return _Const(out)
            return [_Const(o) for o in out]
        conv = lambda a: self.tensor_arg(a, hint) if isinstance(a, _Const) else ([conv(b) for b in a] if isinstance(a, list) else a)  # noqa: E731
        node = self.graph.call_function(fn, tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()})
        if n_out == 1:
            return node
        return [self.graph.call_function(operator.getitem, (node, i)) for i in range(n_out)]

    # ---- weight layers
    def linear(self, d: _Deferred, bias: _Const | None, add_node=None):
        """The deferred MatMul as an nn.Linear (weight = B^T), with the Add's constant as its bias."""
        w = d.w
        out_f, in_f = w.t.shape[1], w.t.shape[0]
        with torch.device("meta"):
            lin = nn.Linear(in_f, out_f, bias=bias is not None)
        lin.weight = self.param(w, (("permute", (1, 0)),))
        if bias is not None:
            lin.bias = self.param(bias)
        bias_name = None
        if add_node is not None:
            bias_name = next((i for i in add_node.input if i != d.node.output[0]), None)
        want = [_torch_owner(d.node.input[1]), _torch_owner(bias_name, "bias"),
                bias is not None and bias.origin is not None and _torch_owner(bias.origin[0], "bias"), _scope_name(d.node, False)]
        return self.call_module(want, "linear", lin, self.tensor_arg(d.x))

    # ---- main loop
    def run(self, input_name: str, shape: list) -> None:
        ph = self.graph.placeholder(_clean_component(input_name))
        self.env[input_name] = ph
        from onnx import helper

        needed = self._needed()
        for k, node in enumerate(self.proto.graph.node):
            if k not in needed:
                continue
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            handler = _HANDLERS.get(node.op_type) if not domain else None
            if handler is None:
                op = f"{domain}::{node.op_type}" if domain else node.op_type
                raise NetmendError(f"{self.path}: ONNX op {op!r} (node {node.name!r}) is not supported by netmend's "
                                   f"converter; supported: {_SUPPORTED_SHORT}")
            self.current = k
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
            ins = [self.value(i, raw=node.op_type == "Add") if i else None for i in node.input]
            outs = handler(self, node, ins, attrs)
            if not isinstance(outs, list):
                outs = [outs]
            for name, v in zip(node.output, outs):
                if name:
                    if isinstance(v, _Const) and v.name is None:
                        v.name = name
                    self.env[name] = v

    def _needed(self) -> set[int]:
        """Indices of the nodes the first graph output depends on."""
        nodes = list(self.proto.graph.node)
        producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
        need: set[int] = set()
        stack = [self.proto.graph.output[0].name]
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v in seen or v not in producer:
                continue
            seen.add(v)
            k = producer[v]
            need.add(k)
            stack.extend(i for i in nodes[k].input if i)
        return need


def _torch_like_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", name)) and not name.startswith("onnx")


# ------------------------------------------------------------------ op handlers

def _h_conv(cv: _Converter, node, ins, at):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    if not isinstance(w, _Const) or (b is not None and not isinstance(b, _Const)) or isinstance(x, _Const):
        args = [x, w, b]
        k = (w.t.dim() if isinstance(w, _Const) else cv.rank(node.input[1]) or 4) - 2
        pads = at.get("pads", [0] * 2 * k)
        if pads[:k] != pads[k:]:
            raise cv.fail(node, "asymmetric padding with a computed weight is not supported")
        return cv.call(_op_conv, *args, stride=at.get("strides", [1] * k), padding=pads[:k],
                       dilation=at.get("dilations", [1] * k), groups=at.get("group", 1))
    k = w.t.dim() - 2
    if k not in (1, 2, 3):
        raise cv.fail(node, f"{k}-D convolution is not supported")
    strides = list(at.get("strides", [1] * k))
    dil = list(at.get("dilations", [1] * k))
    kernel = list(w.t.shape[2:])
    pads = list(at.get("pads", [0] * 2 * k))
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(cv, node, kernel, strides, dil, auto)
    elif auto == "VALID":
        pads = [0] * 2 * k
    groups = int(at.get("group", 1))
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[k]
    begin, end = pads[:k], pads[k:]
    with torch.device("meta"):
        conv = cls(w.t.shape[1] * groups, w.t.shape[0], kernel, stride=strides, dilation=dil, groups=groups,
                   padding=begin if begin == end else 0, bias=b is not None)
    conv.weight = cv.param(w)
    if b is not None:
        conv.bias = cv.param(b)
    if begin != end:
        tp: list[int] = []
        for d in reversed(range(k)):
            tp += [begin[d], end[d]]
        x = cv.graph.call_function(F.pad, (x, tp))
    want = [_torch_owner(node.input[1]), b is not None and _torch_owner(node.input[2], "bias"), _scope_name(node, False)]
    return cv.call_module(want, "conv", conv, x)


def _same_pads(cv, node, kernel, strides, dil, auto):
    k = len(kernel)
    shape = cv.shapes.get(node.input[0])
    pads_b, pads_e = [], []
    for i in range(k):
        eff = (kernel[i] - 1) * dil[i] + 1
        size = shape[2 + i] if shape is not None and len(shape) == k + 2 else None
        if isinstance(size, int) and size > 0:
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + eff - size)
        elif strides[i] == 1:
            total = eff - 1
        else:
            raise cv.fail(node, f"auto_pad={auto} with stride > 1 needs a known input size")
        small = total // 2
        pads_b.append(small if auto == "SAME_UPPER" else total - small)
        pads_e.append(total - small if auto == "SAME_UPPER" else small)
    return pads_b + pads_e


def _h_gemm(cv, node, ins, at):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    if isinstance(b, _Const) and not isinstance(a, _Const) and not ta and b.t.dim() == 2:
        out_f = b.t.shape[0] if tb else b.t.shape[1]
        in_f = b.t.shape[1] if tb else b.t.shape[0]
        bias_ok = isinstance(c, _Const) and c.t.numel() == out_f and tuple(c.t.shape) in ((out_f,), (1, out_f))
        with torch.device("meta"):
            lin = nn.Linear(in_f, out_f, bias=bias_ok)
        steps: tuple = ()
        if alpha != 1.0:
            steps += (("div", alpha),)
        if not tb:
            steps += (("permute", (1, 0)),)
        lin.weight = cv.param(b, steps)
        if bias_ok:
            bsteps: tuple = ()
            if beta != 1.0:
                bsteps += (("div", beta),)
            if c.t.dim() == 2:
                bsteps += (("reshape", (1, out_f), (out_f,)),)
            lin.bias = cv.param(c, bsteps)
        want = [_torch_owner(node.input[1]), bias_ok and _torch_owner(node.input[2], "bias"), _scope_name(node, False)]
        y = cv.call_module(want, "linear", lin, a)
        if c is not None and not bias_ok:
            y = cv.call(torch.add, y, c if beta == 1.0 else cv.call(torch.mul, c, beta), hint=_hint(node))
        return y
    return cv.call(_op_gemm, a, b, c, alpha=alpha, beta=beta, trans_a=ta, trans_b=tb, hint=_hint(node))


def _h_matmul(cv, node, ins, at):
    a, b = ins
    if isinstance(b, _Const) and not isinstance(a, _Const) and b.t.dim() == 2 and b.t.is_floating_point():
        d = _Deferred(a, b, node)
        users = cv.consumers.get(node.output[0], [])
        if (len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in cv.graph_outputs):
            return d     # the Add decides: bias or not
        return cv.linear(d, None)
    return cv.call(torch.matmul, a, b, hint=_hint(node))


def _h_binary(cv, node, ins, at):
    a, b = ins[0], ins[1]
    if node.op_type == "Add":
        for d, c in ((a, b), (b, a)):
            if isinstance(d, _Deferred):
                n = d.w.t.shape[1]
                if isinstance(c, _Const) and c.t.dim() == 1 and c.t.shape[0] == n and c.t.dtype == d.w.t.dtype:
                    return cv.linear(d, c, node)
        a, b = (cv.linear(a, None) if isinstance(a, _Deferred) else a), (cv.linear(b, None) if isinstance(b, _Deferred) else b)
    if node.op_type == "Mod":
        return cv.call(_op_mod, a, b, fmod=int(at.get("fmod", 0)), hint=_hint(node))
    return cv.call(_BINARY[node.op_type], a, b, hint=_hint(node))


def _h_unary(cv, node, ins, at):
    return cv.call(_UNARY[node.op_type], ins[0], hint=_hint(node))


def _hint(node) -> str:
    return re.sub(r"\W", "_", node.output[0]).strip("_") or "c"


def _h_activation(cv, node, ins, at):
    mod = _ACTIVATION_MODULES[node.op_type](at)
    if isinstance(ins[0], _Const):
        return cv.call(mod.forward, ins[0])
    return cv.call_module(_scope_name(node, True), node.op_type.lower(), mod, ins[0])


def _h_softmax(cv, node, ins, at):
    log = node.op_type == "LogSoftmax"
    x = ins[0]
    new = cv.opset >= 13
    axis = int(at.get("axis", -1 if new else 1))
    r = cv.rank(node.input[0])
    if new or axis == -1 or (r is not None and axis == r - 1):
        mod = nn.LogSoftmax(dim=axis) if log else nn.Softmax(dim=axis)
        if isinstance(x, _Const):
            return cv.call(mod.forward, x)
        return cv.call_module(_scope_name(node, True), node.op_type.lower(), mod, x)
    return cv.call(_op_softmax_2d, x, axis, log)


def _h_hard_sigmoid(cv, node, ins, at):
    alpha, beta = float(at.get("alpha", 0.2)), float(at.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5 and not isinstance(ins[0], _Const):
        return cv.call_module(_scope_name(node, True), "hardsigmoid", nn.Hardsigmoid(), ins[0])
    return cv.call(_op_hard_sigmoid, ins[0], alpha, beta)


def _h_selu(cv, node, ins, at):
    alpha, gamma = float(at.get("alpha", 1.67326319217681884765625)), float(at.get("gamma", 1.05070102214813232421875))
    if abs(alpha - 1.6732632423543772) < 1e-6 and abs(gamma - 1.0507009873554805) < 1e-6 and not isinstance(ins[0], _Const):
        return cv.call_module(_scope_name(node, True), "selu", nn.SELU(), ins[0])
    return cv.call(_op_selu, ins[0], alpha, gamma)


def _h_prelu(cv, node, ins, at):
    return cv.call(_op_prelu, ins[0], ins[1], hint=_hint(node))


def _h_clip(cv, node, ins, at):
    x = ins[0]
    if "min" in at or "max" in at:    # opset < 11
        lo, hi = at.get("min"), at.get("max")
    else:
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
        if isinstance(lo, _Const):
            lo = float(lo.t.reshape(-1)[0]) if lo.t.is_floating_point() else int(lo.t.reshape(-1)[0])
        if isinstance(hi, _Const):
            hi = float(hi.t.reshape(-1)[0]) if hi.t.is_floating_point() else int(hi.t.reshape(-1)[0])
    if not isinstance(x, _Const) and isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        mod = nn.ReLU6() if (lo == 0 and hi == 6) else nn.Hardtanh(float(lo), float(hi))
        return cv.call_module(_scope_name(node, True), "relu6" if lo == 0 and hi == 6 else "clip", mod, x)
    return cv.call(_op_clip, x, lo, hi)


def _h_batchnorm(cv, node, ins, at):
    x, scale, bias, mean, var = ins[:5]
    if int(at.get("training_mode", 0)):
        raise cv.fail(node, "training_mode=1 is not supported (export the model in eval mode)")
    if int(at.get("spatial", 1)) == 0:
        raise cv.fail(node, "spatial=0 is not supported")
    if any(o for o in node.output[1:]):
        raise cv.fail(node, "training outputs (running mean/var) are not supported")
    eps = float(at.get("epsilon", 1e-5))
    if not all(isinstance(v, _Const) for v in (scale, bias, mean, var)) or isinstance(x, _Const):
        return cv.call(_op_batch_norm, x, scale, bias, mean, var, eps)
    r = cv.rank(node.input[0])
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(r, OnnxBatchNorm)
    c = scale.t.shape[0]
    with torch.device("meta"):
        bn = cls(c, eps=eps)
    bn.weight = cv.param(scale)
    bn.bias = cv.param(bias)
    bn.running_mean = cv.buffer_tensor(mean)
    bn.running_var = cv.buffer_tensor(var)
    bn.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    bn.eval()
    want = [_torch_owner(node.input[1]), _torch_owner(node.input[2], "bias"), _scope_name(node, False)]
    return cv.call_module(want, "bn", bn, x)


def _h_layernorm(cv, node, ins, at):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    if any(o for o in node.output[1:]):
        raise cv.fail(node, "Mean / InvStdDev outputs are not supported")
    axis = int(at.get("axis", -1))
    eps = float(at.get("epsilon", 1e-5))
    r = cv.rank(node.input[0])
    last = axis == -1 or (r is not None and axis == r - 1)
    if last and isinstance(scale, _Const) and scale.t.dim() == 1 and (bias is None or (isinstance(bias, _Const) and bias.t.shape == scale.t.shape)) \
            and not isinstance(x, _Const):
        with torch.device("meta"):
            ln = nn.LayerNorm(scale.t.shape[0], eps=eps, bias=bias is not None)
        ln.weight = cv.param(scale)
        if bias is not None:
            ln.bias = cv.param(bias)
        want = [_torch_owner(node.input[1]), bias is not None and _torch_owner(node.input[2], "bias"), _scope_name(node, False)]
        return cv.call_module(want, "layer_norm", ln, x)
    return cv.call(_op_layer_norm, x, scale, bias, axis, eps)


def _h_instancenorm(cv, node, ins, at):
    return cv.call(_op_instance_norm, ins[0], ins[1], ins[2], float(at.get("epsilon", 1e-5)))


def _h_lrn(cv, node, ins, at):
    mod = nn.LocalResponseNorm(int(at["size"]), float(at.get("alpha", 1e-4)), float(at.get("beta", 0.75)), float(at.get("bias", 1.0)))
    return cv.call_module(_scope_name(node, True), "lrn", mod, ins[0])


def _pool_geometry(cv, node, at):
    kernel = list(at["kernel_shape"])
    k = len(kernel)
    strides = list(at.get("strides", [1] * k))
    dil = list(at.get("dilations", [1] * k))
    pads = list(at.get("pads", [0] * 2 * k))
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(cv, node, kernel, strides, dil, auto)
    elif auto == "VALID":
        pads = [0] * 2 * k
    return kernel, strides, dil, pads


def _h_maxpool(cv, node, ins, at):
    if len(node.output) > 1 and node.output[1]:
        raise cv.fail(node, "the Indices output is not supported")
    kernel, strides, dil, pads = _pool_geometry(cv, node, at)
    k = len(kernel)
    if k not in (1, 2, 3):
        raise cv.fail(node, f"{k}-D pooling is not supported")
    begin, end = pads[:k], pads[k:]
    x = ins[0]
    sym = begin == end and all(2 * p <= ((kk - 1) * d + 1) for p, kk, d in zip(begin, kernel, dil))
    if not sym and any(pads):
        tp: list[int] = []
        for d in reversed(range(k)):
            tp += [begin[d], end[d]]
        x = cv.call(_op_pool_pad, x, tp, float("-inf"))
        begin = [0] * k
    cls = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[k]
    mod = cls(kernel, stride=strides, padding=begin, dilation=dil, ceil_mode=bool(at.get("ceil_mode", 0)))
    return cv.call_module(_scope_name(node, True), "maxpool", mod, x)


def _h_avgpool(cv, node, ins, at):
    kernel, strides, dil, pads = _pool_geometry(cv, node, at)
    k = len(kernel)
    if k not in (1, 2, 3):
        raise cv.fail(node, f"{k}-D pooling is not supported")
    if any(d != 1 for d in dil):
        raise cv.fail(node, "dilated average pooling is not supported")
    include = bool(at.get("count_include_pad", 0))
    begin, end = pads[:k], pads[k:]
    x = ins[0]
    sym = begin == end and all(2 * p <= kk for p, kk in zip(begin, kernel))
    if not sym and any(pads):
        if not include:
            raise cv.fail(node, "asymmetric padding with count_include_pad=0 is not supported")
        tp: list[int] = []
        for d in reversed(range(k)):
            tp += [begin[d], end[d]]
        x = cv.call(_op_pool_pad, x, tp, 0.0)
        begin = [0] * k
    cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[k]
    mod = cls(kernel, stride=strides, padding=begin, ceil_mode=bool(at.get("ceil_mode", 0)), count_include_pad=include)
    return cv.call_module(_scope_name(node, True), "avgpool", mod, x)


def _h_global_pool(cv, node, ins, at):
    avg = node.op_type == "GlobalAveragePool"
    r = cv.rank(node.input[0])
    table = ({3: nn.AdaptiveAvgPool1d, 4: nn.AdaptiveAvgPool2d, 5: nn.AdaptiveAvgPool3d} if avg
             else {3: nn.AdaptiveMaxPool1d, 4: nn.AdaptiveMaxPool2d, 5: nn.AdaptiveMaxPool3d})
    if r in table and not isinstance(ins[0], _Const):
        return cv.call_module(_scope_name(node, True), "avgpool" if avg else "maxpool", table[r](1), ins[0])
    return cv.call(_op_global_pool, ins[0], "avg" if avg else "max")


def _h_flatten(cv, node, ins, at):
    axis = int(at.get("axis", 1))
    x = ins[0]
    if isinstance(x, _Const):
        out = _op_flatten(x.t, axis)
        return _Const(out, _reshaped(x, out))
    r = cv.rank(node.input[0])
    mod = nn.Flatten() if axis == 1 and (r is None or r >= 2) else OnnxFlatten(axis)
    return cv.call_module(_scope_name(node, True), "flatten", mod, x)


def _reshaped(c: _Const, out: torch.Tensor):
    if c.origin is None:
        return None
    return (c.origin[0], (("reshape", tuple(c.t.shape), tuple(out.shape)),) + tuple(c.origin[1]))


def _h_reshape(cv, node, ins, at):
    x, shape = ins[0], ins[1] if len(ins) > 1 else None
    allowzero = int(at.get("allowzero", 0))
    s = cv.static(shape) if shape is not None else list(at.get("shape", []))
    if isinstance(x, _Const) and isinstance(s, list):
        out = _op_reshape(x.t, s, allowzero)
        return _Const(out, _reshaped(x, out))
    if isinstance(s, list) and cv.fixed_batch is not None and s and s[0] == cv.fixed_batch and not allowzero:
        data_shape = cv.shapes.get(node.input[0])
        if data_shape and data_shape[0] == cv.fixed_batch:
            s = [0] + s[1:]     # keep the batch dim: the file fixed it, the model must not
    return cv.call(_op_reshape, x, s, allowzero)


def _h_transpose(cv, node, ins, at):
    x = ins[0]
    perm = at.get("perm")
    if isinstance(x, _Const):
        perm = list(perm) if perm is not None else list(range(x.t.dim() - 1, -1, -1))
        out = x.t.permute(perm)
        origin = None
        if x.origin is not None:
            inv = tuple(int(i) for i in np.argsort(perm))
            origin = (x.origin[0], (("permute", inv),) + tuple(x.origin[1]))
        return _Const(out, origin)
    return cv.call(_op_transpose, x, list(perm) if perm is not None else None)


def _h_squeeze(cv, node, ins, at):
    x = ins[0]
    axes = at.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = cv.static(ins[1])
    if isinstance(x, _Const) and not isinstance(axes, fx.Node):
        out = _op_squeeze(x.t, axes)
        return _Const(out, _reshaped(x, out))
    return cv.call(_op_squeeze, x, axes)


def _h_unsqueeze(cv, node, ins, at):
    x = ins[0]
    axes = at.get("axes")
    if axes is None:
        axes = cv.static(ins[1])
    if isinstance(x, _Const) and not isinstance(axes, fx.Node):
        out = _op_unsqueeze(x.t, axes)
        return _Const(out, _reshaped(x, out))
    return cv.call(_op_unsqueeze, x, axes)


def _h_identity(cv, node, ins, at):
    return ins[0]


def _h_dropout(cv, node, ins, at):
    if len(node.output) > 1 and node.output[1]:
        return cv.call(_op_dropout, ins[0], n_out=2)
    return ins[0]


def _h_constant(cv, node, ins, at):
    from onnx import numpy_helper

    if "value" in at:
        return _Const(torch.from_numpy(np.array(numpy_helper.to_array(at["value"]), copy=True)))
    if "value_float" in at:
        return _Const(torch.tensor(float(at["value_float"]), dtype=torch.float32))
    if "value_floats" in at:
        return _Const(torch.tensor(list(at["value_floats"]), dtype=torch.float32))
    if "value_int" in at:
        return _Const(torch.tensor(int(at["value_int"]), dtype=torch.int64))
    if "value_ints" in at:
        return _Const(torch.tensor(list(at["value_ints"]), dtype=torch.int64))
    raise cv.fail(node, f"constant attribute {node.attribute[0].name!r} is not supported")


def _h_shape(cv, node, ins, at):
    x = ins[0]
    start, end = int(at.get("start", 0)), at.get("end")
    end = int(end) if end is not None else None
    if isinstance(x, _Const):
        return _Const(_op_shape(x.t, start, end))
    return cv.call(_op_shape, x, start, end)


def _h_size(cv, node, ins, at):
    return cv.call(_op_size, ins[0], reads_values=False)


def _h_gather(cv, node, ins, at):
    x, idx = ins
    return cv.call(_op_gather, x, cv.static(idx, 64),
                   int(at.get("axis", 0)), hint=_hint(node))


def _h_slice(cv, node, ins, at):
    x = ins[0]
    if "starts" in at:     # opset < 10
        args = [at["starts"], at["ends"], at.get("axes"), None]
    else:
        args = [cv.static(v) if v is not None else None for v in (ins[1:] + [None] * 4)[:4]]
    return cv.call(_op_slice, x, *args)


def _h_concat(cv, node, ins, at):
    xs = [cv.static(v) if isinstance(v, _Const) and not v.t.is_floating_point() and v.t.dim() == 1
          and any(not isinstance(o, _Const) for o in ins) else v for v in ins]
    return cv.call(_op_concat, int(at["axis"]), *xs, hint=_hint(node))


def _h_cast(cv, node, ins, at):
    to = int(at["to"])
    if to not in _DTYPES:
        raise cv.fail(node, f"cast to ONNX type {to} is not supported")
    return cv.call(_op_cast, ins[0], _DTYPES[to])


def _h_cast_like(cv, node, ins, at):
    x, like = ins
    dtype = _DTYPES.get(cv.dtypes.get(node.input[1], 0))
    if isinstance(x, _Const) and not isinstance(like, _Const) and dtype is not None:
        return _Const(x.t.to(dtype))     # only the dtype of the live value matters
    return cv.call(_op_cast_like, x, like)


def _h_reduce(cv, node, ins, at):
    axes = at.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = cv.static(ins[1])
    return cv.call(_op_reduce, ins[0], axes, int(at.get("keepdims", 1)), int(at.get("noop_with_empty_axes", 0)),
                   _REDUCE[node.op_type])


def _h_arg(cv, node, ins, at):
    return cv.call(_op_arg, ins[0], int(at.get("axis", 0)), int(at.get("keepdims", 1)),
                   int(at.get("select_last_index", 0)), "max" if node.op_type == "ArgMax" else "min")


def _h_pad(cv, node, ins, at):
    mode = at.get("mode", "constant")
    if "pads" in at:        # opset < 11
        return cv.call(_op_pad, ins[0], list(at["pads"]), float(at.get("value", 0.0)), None, mode)
    pads = cv.static(ins[1])
    value = ins[2] if len(ins) > 2 else None
    axes = cv.static(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    if isinstance(value, _Const):
        value = float(value.t.reshape(-1)[0]) if value.t.numel() else 0.0
    return cv.call(_op_pad, ins[0], pads, value if value is not None else 0.0, axes, mode)


def _h_variadic(cv, node, ins, at):
    return cv.call(_op_variadic, node.op_type.lower(), *ins, hint=_hint(node))


def _h_where(cv, node, ins, at):
    return cv.call(_op_where, *ins, hint=_hint(node))


def _h_expand(cv, node, ins, at):
    return cv.call(_op_expand, ins[0], cv.static(ins[1]), hint=_hint(node))


def _h_tile(cv, node, ins, at):
    return cv.call(_op_tile, ins[0], cv.static(ins[1]), hint=_hint(node))


def _h_constant_of_shape(cv, node, ins, at):
    from onnx import numpy_helper

    value = torch.from_numpy(np.array(numpy_helper.to_array(at["value"]), copy=True)) if "value" in at \
        else torch.zeros(1, dtype=torch.float32)
    return cv.call(_op_constant_of_shape, cv.static(ins[0]), value.reshape(-1)[0].item(), value.dtype)


def _h_range(cv, node, ins, at):
    return cv.call(_op_range, *ins)


def _h_split(cv, node, ins, at):
    axis = int(at.get("axis", 0))
    split = at.get("split")
    if split is None and len(ins) > 1 and ins[1] is not None:
        split = cv.static(ins[1])
    outs = cv.call(_op_split, ins[0], split, axis, len(node.output), n_out=len(node.output))
    return outs


def _h_resize(cv, node, ins, at):
    if node.op_type == "Upsample" or cv.opset < 11:     # before opset 11: asymmetric coordinates, floor
        mode = at.get("mode", "nearest")
        scales = list(at["scales"]) if "scales" in at else cv.static(ins[1])
        sizes = None
        ctm, nearest = "asymmetric", "floor"
    else:
        mode = at.get("mode", "nearest")
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        nearest = at.get("nearest_mode", "round_prefer_floor")
        if int(at.get("antialias", 0)) or at.get("axes") is not None:
            raise cv.fail(node, "antialias / axes are not supported")
        scales = cv.static(ins[2]) if len(ins) > 2 and ins[2] is not None else None
        sizes = cv.static(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        if isinstance(scales, list) and not scales:
            scales = None
    r = cv.rank(node.input[0])
    if mode == "nearest" and ctm == "asymmetric" and nearest == "floor":
        tmode, align = "nearest", None
    elif mode in ("linear", "bilinear") and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        tmode = {3: "linear", 4: "bilinear", 5: "trilinear"}.get(r or 4, "bilinear")
        align = ctm == "align_corners"
    else:
        raise cv.fail(node, f"mode={mode} with coordinate_transformation_mode={ctm} (nearest_mode={nearest}) is not supported")
    if isinstance(scales, list) and scales[:2] not in ([1.0, 1.0], [1, 1]):
        raise cv.fail(node, "scaling the batch or channel axis is not supported")
    return cv.call(_op_resize, ins[0], scales, sizes, tmode, align)


_HANDLERS: dict[str, Callable] = {
    "Conv": _h_conv, "Gemm": _h_gemm, "MatMul": _h_matmul, "BatchNormalization": _h_batchnorm,
    "LayerNormalization": _h_layernorm, "InstanceNormalization": _h_instancenorm, "LRN": _h_lrn,
    "Softmax": _h_softmax, "LogSoftmax": _h_softmax, "HardSigmoid": _h_hard_sigmoid, "Selu": _h_selu,
    "PRelu": _h_prelu, "Clip": _h_clip,
    "MaxPool": _h_maxpool, "AveragePool": _h_avgpool, "GlobalAveragePool": _h_global_pool,
    "GlobalMaxPool": _h_global_pool, "Flatten": _h_flatten, "Reshape": _h_reshape, "Transpose": _h_transpose,
    "Squeeze": _h_squeeze, "Unsqueeze": _h_unsqueeze, "Identity": _h_identity, "Dropout": _h_dropout,
    "Constant": _h_constant, "Shape": _h_shape, "Size": _h_size, "Gather": _h_gather, "Slice": _h_slice,
    "Concat": _h_concat, "Cast": _h_cast, "CastLike": _h_cast_like, "ArgMax": _h_arg, "ArgMin": _h_arg,
    "Pad": _h_pad, "Sum": _h_variadic, "Mean": _h_variadic, "Max": _h_variadic, "Min": _h_variadic,
    "Where": _h_where, "Expand": _h_expand, "Tile": _h_tile, "ConstantOfShape": _h_constant_of_shape,
    "Range": _h_range, "Split": _h_split, "Resize": _h_resize, "Upsample": _h_resize, "Mod": _h_binary,
}
_HANDLERS.update({op: _h_activation for op in _ACTIVATION_MODULES})
_HANDLERS.update({op: _h_unary for op in _UNARY})
_HANDLERS.update({op: _h_binary for op in _BINARY})
_HANDLERS.update({op: _h_reduce for op in _REDUCE})

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_HANDLERS))
_SUPPORTED_SHORT = ("Conv, Gemm, MatMul, BatchNormalization, LayerNormalization, Relu/Sigmoid/Tanh/Gelu/Softmax and "
                    "other activations, Max/Average/Global pooling, Flatten, elementwise math, Reshape/Transpose/"
                    "Concat/Slice/Gather and other shape ops (full list: netmend.formats.onnx_model.SUPPORTED_OPS)")


# ------------------------------------------------------------------ loading

def file_sha256(path: Path) -> str:
    """The file's SHA-256: a writer refuses to patch a source that changed since it was loaded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _external_tensors(proto):
    from onnx import TensorProto

    for init in proto.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            yield init
    for node in proto.graph.node:
        for a in node.attribute:
            if a.HasField("t") and a.t.data_location == TensorProto.EXTERNAL:
                yield a.t


def _check_external(proto, path: Path) -> bool:
    """Every external data file must resolve inside the model's folder. True if there are any."""
    base = path.parent.resolve()
    found = False
    for t in _external_tensors(proto):
        found = True
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve() if loc else None
        if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts or target is None \
                or not target.is_relative_to(base):
            raise NetmendError(f"{path}: initializer {t.name!r} keeps its data in {loc!r}, outside the model's folder; "
                               "netmend only reads external data next to the model file")
        if not target.is_file():
            raise NetmendError(f"{path}: external data file {loc!r} for initializer {t.name!r} not found next to the model")
    return found


def _read_proto(path: Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise NetmendError(f"ONNX file not found: {path}" if not path.exists() else f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:   # DecodeError, ValueError, OSError ...
        raise NetmendError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {first_line(exc)})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.input):
        raise NetmendError(f"{path}: not an ONNX model (no graph)")
    external = _check_external(proto, path)
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise NetmendError(f"{path}: cannot read the external data ({type(exc).__name__}: {first_line(exc)})") from None
    return proto, external


def load_onnx(path: str | os.PathLike) -> tuple[fx.GraphModule, OnnxSource]:
    """An ONNX classifier as an eval-mode `torch.fx.GraphModule` plus its `OnnxSource`.

    Raises NetmendError (one line) for a missing / unreadable / invalid file, external data outside
    the model's folder, NaN/Inf initializers, zero or several graph inputs, and unsupported ops."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    proto, external = _read_proto(path)
    try:
        onnx.checker.check_model(str(path) if external else proto)
    except Exception as exc:
        raise NetmendError(f"{path}: invalid ONNX model (onnx.checker: {first_line(exc)})") from None
    g = proto.graph
    for init in g.initializer:
        if init.data_type in (1, 10, 11, 16):      # float, float16, double, bfloat16
            try:
                arr = numpy_helper.to_array(init)
            except Exception:   # pragma: no cover - odd dtypes are reported by the converter
                continue
            if arr.size and not np.isfinite(np.asarray(arr, dtype=np.float64)).all():
                raise NetmendError(f"{path}: initializer {init.name!r} contains NaN or infinite values")
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if not inputs:
        raise NetmendError(f"{path}: the ONNX graph has no input")
    if len(inputs) > 1:
        names = ", ".join(repr(i.name) for i in inputs[:5])
        raise NetmendError(f"{path}: the ONNX graph has {len(inputs)} inputs ({names}); netmend supports models with one input")
    if not g.output:
        raise NetmendError(f"{path}: the ONNX graph has no output")
    inp = inputs[0]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

    dims = list(inp.type.tensor_type.shape.dim) if inp.type.tensor_type.HasField("shape") else []
    shape: list = []
    for d in dims:
        shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or -1))
    fixed_batch = None
    if shape:
        if isinstance(shape[0], int) and shape[0] > 0:
            fixed_batch = shape[0]
            shape[0] = -1
        elif shape[0] in ("", 0):
            shape[0] = -1

    shapes: dict[str, list] = {}
    dtypes: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                dtypes[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    except Exception:
        pass   # ranks unknown: the converter falls back to rank-agnostic functions

    cv = _Converter(proto, path, opset, shapes)
    cv.dtypes = dtypes
    cv.fixed_batch = fixed_batch
    cv.run(inp.name, shape)
    out = cv.value(g.output[0].name)
    if isinstance(out, _Const):
        raise NetmendError(f"{path}: the first graph output {g.output[0].name!r} does not depend on the input")
    cv.graph.output(out)
    gm = fx.GraphModule(cv.root, cv.graph, class_name="OnnxModel")
    if gm.graph.eliminate_dead_code():      # e.g. unused outputs of Split / Dropout
        gm.delete_all_unused_submodules()
        gm.recompile()
    gm.eval()

    params: dict[str, tuple[str, Transform]] = {}
    nodes: dict[str, int] = {}
    unmapped: dict[str, torch.Tensor] = {}
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if id(t) in cv.origin:
            params[name] = cv.origin[id(t)]
            if id(t) in cv.node_of:
                nodes[name] = cv.node_of[id(t)]
        elif not name.endswith("num_batches_tracked"):
            unmapped[name] = t.detach().clone()
    shared: dict[str, list[str]] = {}
    for name, (init, _) in params.items():
        shared.setdefault(init, []).append(name)
    shared = {k: v for k, v in shared.items() if len(v) > 1}
    elem = inp.type.tensor_type.elem_type
    source = OnnxSource(
        path=path, input_name=inp.name, input_shape=tuple(shape), output_names=[o.name for o in g.output],
        opset=opset, params=params, input_dtype=str(_DTYPES.get(elem, torch.float32)).replace("torch.", ""),
        fixed_batch=fixed_batch, external_data=external, sha256=file_sha256(path), shared=shared, nodes=nodes,
        folded={i for i in cv.folded if any(i == p[0] for p in params.values())},
        unmapped=unmapped)
    return gm, source


# ------------------------------------------------------------------ writing

def write_onnx(source: OnnxSource, model: nn.Module, out_path: str | os.PathLike) -> None:
    """Write `model`'s tensors into a copy of the original ONNX file (only initializers whose tensors
    changed are touched), atomically. One-line NetmendError when a change cannot be written."""
    import onnx
    from onnx import numpy_helper

    out_path = Path(out_path)
    src = Path(source.path)
    if not src.is_file():
        raise NetmendError(f"cannot write {out_path}: the original ONNX file {src} is gone")
    if source.sha256 and file_sha256(src) != source.sha256:
        raise NetmendError(f"cannot write {out_path}: {src} changed since it was loaded; load it again")
    proto, external = _read_proto(src)
    inits = {i.name: i for i in proto.graph.initializer}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))

    for name, orig in source.unmapped.items():
        t = tensors.get(name)
        if t is not None and (t.shape != orig.shape or not torch.equal(t.detach().cpu(), orig)):
            raise NetmendError(f"cannot write {out_path}: tensor {name!r} changed but has no ONNX initializer to hold it")
    missing = [n for n in source.params if n not in tensors]
    if missing:
        raise NetmendError(f"cannot write {out_path}: the model lacks tensors of the ONNX file: {missing[:3]}")

    # every mapped tensor's value as its initializer would hold it; initializers whose tensors all agree are written
    # in place, and a shared initializer whose tensors now differ is split: each changed tensor gets its own copy
    # and the one node it came in with reads that copy (node names, graph inputs and outputs stay as they were)
    wanted: dict[str, list[tuple[str, np.ndarray, bool]]] = {}     # initializer -> [(tensor, value, changed)]
    for name, (init_name, transform) in source.params.items():
        if init_name not in inits:
            raise NetmendError(f"cannot write {out_path}: initializer {init_name!r} is not in {src}")
        init = inits[init_name]
        dtype = numpy_helper.to_array(init).dtype
        orig = torch.from_numpy(np.array(numpy_helper.to_array(init), copy=True))
        t = tensors[name].detach().cpu()
        expect = from_initializer(orig, transform)
        changed = not (t.shape == expect.shape and torch.equal(t.to(expect.dtype), expect))
        value = to_initializer(t.to(torch.float64) if t.is_floating_point() else t, transform)
        if tuple(value.shape) != tuple(orig.shape):
            raise NetmendError(f"cannot write {out_path}: {name!r} has shape {tuple(t.shape)}, "
                               f"initializer {init_name!r} needs {tuple(orig.shape)}")
        if changed and init_name in source.folded:
            raise NetmendError(f"cannot write {out_path}: initializer {init_name!r} (for {name!r}) also feeds constants "
                               "that were folded at load time, so a changed value would not be used consistently")
        wanted.setdefault(init_name, []).append((name, value.numpy().astype(dtype), changed))
    nodes = list(proto.graph.node)
    taken = set(inits) | {v for n in nodes for v in list(n.input) + list(n.output)}
    for init_name, entries in wanted.items():
        if not any(changed for _, _, changed in entries):
            continue
        values = [v for _, v, _ in entries]
        if all(np.array_equal(values[0], v) for v in values[1:]):
            _set_initializer(inits[init_name], values[0])
            continue
        for name, arr, changed in entries:
            if not changed:
                continue
            k = source.nodes.get(name)
            if k is None or k >= len(nodes) or init_name not in nodes[k].input:
                others = [n for n, _, _ in entries if n != name]
                raise NetmendError(f"cannot write {out_path}: {name!r} and {others[0]!r} share ONNX initializer "
                                   f"{init_name!r} but now hold different values")
            copy_name, i = f"{init_name}.{name}", 1
            while copy_name in taken:
                copy_name, i = f"{init_name}.{name}.{i}", i + 1
            taken.add(copy_name)
            proto.graph.initializer.append(numpy_helper.from_array(arr, copy_name))
            for j, inp in enumerate(nodes[k].input):
                if inp == init_name:
                    nodes[k].input[j] = copy_name

    if external:
        _save_with_external_data(proto, out_path)
    else:
        atomic_write(out_path, lambda tmp: onnx.save_model(proto, tmp))


def _set_initializer(init, arr: np.ndarray) -> None:
    from onnx import numpy_helper

    doc = init.doc_string
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    init.doc_string = doc


def _save_with_external_data(proto, out_path: Path) -> None:
    """Model + one `<name>.data` file next to it: both written in a temp folder, then renamed."""
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(dir=out_path.parent, prefix=f".{out_path.name}.")
    try:
        data_name = out_path.name + ".data"
        tmp_model = os.path.join(tmpdir, out_path.name)
        onnx.save_model(proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if os.path.exists(os.path.join(tmpdir, data_name)):
            os.replace(os.path.join(tmpdir, data_name), out_path.parent / data_name)
        os.replace(tmp_model, out_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def onnx_layers(model: nn.Module) -> list[tuple[str, str, tuple]]:
    """(name, module type, weight shape or ()) for every leaf module, in registration order."""
    rows = []
    for name, m in model.named_modules():
        if not name or list(m.children()):
            continue
        w = getattr(m, "weight", None)
        rows.append((name, type(m).__name__, tuple(w.shape) if isinstance(w, torch.Tensor) else ()))
    return rows
