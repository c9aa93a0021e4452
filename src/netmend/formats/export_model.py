"""`torch.export` programs (.pt2) as editable modules, and repaired weights saved back as .pt2.

`ep.module()` calls ATen ops on `get_attr` parameters (`aten.conv2d(x, conv1.weight, ...)`), so a
repair method would find no `nn.Conv2d` / `nn.Linear` to hook or edit. `load_pt2` rewrites the graph:
each conv / linear / batch-norm call whose weights are the parameters of one (former) submodule
becomes a `call_module` to a real module registered at that submodule's path, holding the SAME
Parameter objects (so state_dict keys stay the user's: `layer1.0.conv1.weight`); activation calls
become activation modules. The shape guard `torch.export` inserts is dropped, so any batch size
runs (a batch size baked into a reshape is restored from the input's own size, then checked).
"""
from __future__ import annotations

import contextlib
import logging
import operator
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import NetmendError, first_line
from ..edit import usual_permissions
from .onnx_model import ModulePaths, file_sha256

aten = torch.ops.aten


@dataclass
class Pt2Source:
    """Where a converted ExportedProgram came from."""

    path: Path
    state_dict_keys: list[str]
    input_name: str
    input_shape: tuple            # batch dim -1; other dims as in the example input
    example_batch: int | None     # the batch size of the export example
    dynamic_batch: bool           # exported with a symbolic batch dimension
    sha256: str = ""
    constants: list[str] = field(default_factory=list)   # non-persistent buffers / lifted constants


@contextlib.contextmanager
def _quiet_export_logs():
    """torch.export.load logs a full traceback before raising; the CLI wants one line."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.export.pt2_archive._package")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _load_program(path: Path):
    if not path.exists():
        raise NetmendError(f"exported program not found: {path}")
    if not path.is_file():
        raise NetmendError(f"{path}: not a file")
    if not zipfile.is_zipfile(path):
        raise NetmendError(f"{path}: not a torch.export .pt2 archive (not a zip file; truncated or another format)")
    try:
        with _quiet_export_logs():
            return torch.export.load(str(path))
    except Exception as exc:   # RuntimeError (miniz), BadZipFile, KeyError, pickle / version errors ...
        raise NetmendError(f"{path}: cannot load the exported program ({type(exc).__name__}: {first_line(exc)})") from None


# ------------------------------------------------------------------ graph rewriting helpers

def _pair(v) -> list[int] | int:
    return list(v) if isinstance(v, (list, tuple)) else int(v)


def _bind(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _one(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(i) for i in v)


def _owner_of(gm: nn.Module, w: Any, b: Any) -> str | None:
    """`layer1.0.conv1` when w / b are get_attr nodes of `layer1.0.conv1.weight` / `.bias` and that
    submodule holds exactly these parameters and nothing else."""
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith(".weight")):
        return None
    owner = w.target[: -len(".weight")]
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and b.target == owner + ".bias"):
        return None
    try:
        mod = gm.get_submodule(owner)
    except AttributeError:
        return None
    if type(mod) is not nn.Module or list(mod.children()) or mod._buffers:
        return None
    expect = {"weight"} | ({"bias"} if b is not None else set())
    if set(mod._parameters) != expect or any(p is None for p in mod._parameters.values()):
        return None
    return owner


_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
         aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}

_ACTIVATIONS = {
    aten.relu.default: lambda a: nn.ReLU(),
    aten.relu_.default: lambda a: nn.ReLU(),
    aten.gelu.default: lambda a: nn.GELU(approximate=a.get("approximate", "none")),
    aten.sigmoid.default: lambda a: nn.Sigmoid(),
    aten.tanh.default: lambda a: nn.Tanh(),
    aten.silu.default: lambda a: nn.SiLU(),
    aten.silu_.default: lambda a: nn.SiLU(),
    aten.leaky_relu.default: lambda a: nn.LeakyReLU(float(a.get("negative_slope", 0.01))),
    aten.leaky_relu_.default: lambda a: nn.LeakyReLU(float(a.get("negative_slope", 0.01))),
    aten.hardtanh.default: lambda a: (nn.ReLU6() if (float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0))) == (0.0, 6.0)
                                      else nn.Hardtanh(float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0)))),
    aten.hardtanh_.default: lambda a: (nn.ReLU6() if (float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0))) == (0.0, 6.0)
                                       else nn.Hardtanh(float(a.get("min_val", -1.0)), float(a.get("max_val", 1.0)))),
    aten.hardswish.default: lambda a: nn.Hardswish(),
    aten.hardswish_.default: lambda a: nn.Hardswish(),
    aten.hardsigmoid.default: lambda a: nn.Hardsigmoid(),
    # pooling and flattening become modules too: CARE's default sites (the flattened features feeding the first
    # Linear) and the weights that read a unit are found among the leaf modules
    aten.max_pool2d.default: lambda a: nn.MaxPool2d(list(a["kernel_size"]), list(a.get("stride") or a["kernel_size"]),
                                                    _pair(a.get("padding", 0)), _pair(a.get("dilation", 1)),
                                                    ceil_mode=bool(a.get("ceil_mode", False))),
    aten.avg_pool2d.default: lambda a: nn.AvgPool2d(list(a["kernel_size"]), list(a.get("stride") or a["kernel_size"]),
                                                    _pair(a.get("padding", 0)), bool(a.get("ceil_mode", False)),
                                                    bool(a.get("count_include_pad", True)), a.get("divisor_override")),
    aten.adaptive_avg_pool2d.default: lambda a: nn.AdaptiveAvgPool2d(list(a["output_size"])),
    aten.flatten.using_ints: lambda a: nn.Flatten(int(a.get("start_dim", 0)), int(a.get("end_dim", -1))),
}
_INPLACE = {aten.relu_.default, aten.silu_.default, aten.leaky_relu_.default, aten.hardtanh_.default, aten.hardswish_.default}

_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def _val(n: Any):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


class _Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.modules: dict[str, nn.Module] = {}        # new modules by path
        taken = {n for n, _ in gm.named_modules() if n} | {n for n, _ in gm.named_parameters()} \
            | {n for n, _ in gm.named_buffers()}
        leaves = {n for n, _ in gm.named_parameters()} | {n for n, _ in gm.named_buffers()}
        self.paths = ModulePaths(taken, leaves)

    def replace(self, node: fx.Node, path: str, module: nn.Module, x: fx.Node) -> fx.Node:
        if path not in self.modules:
            self.modules[path] = module
            *parent, last = path.split(".")
            owner = self.gm.get_submodule(".".join(parent)) if parent else self.gm
            setattr(owner, last, module)
        with self.graph.inserting_before(node):
            new = self.graph.call_module(path, (x,))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return new

    def _same_users(self, attr: fx.Node, node: fx.Node, key) -> bool:
        """Every use of the parameter is an equivalent call (a module called twice is fine)."""
        return all(u.op == "call_function" and key(u) == key(node) for u in attr.users)

    def weight_layers(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            t = node.target
            if t in _CONV or t is aten.convolution.default:
                self._conv(node)
            elif t is aten.linear.default:
                self._linear(node)
            elif t is aten.addmm.default:
                self._addmm(node)
            elif t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
                self._batch_norm(node)

    def _conv(self, node: fx.Node) -> None:
        a = _bind(node)
        if node.target is aten.convolution.default:
            if a["transposed"]:
                return
            k = len(a["stride"])
        else:
            k = _CONV[node.target]
        w, b = a["weight"], a.get("bias")
        owner = _owner_of(self.gm, w, b)
        if owner is None or owner in self.modules:
            return
        key = lambda n: (n.target, tuple(repr(v) for name, v in _bind(n).items() if name != "input"))  # noqa: E731
        if not self._same_users(w, node, key) or (b is not None and not self._same_users(b, node, key)):
            return
        weight = self.gm.get_parameter(w.target)
        pad = a.get("padding", 0)
        padding = pad if isinstance(pad, str) else _one(pad)
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[k]
        groups = int(a.get("groups", 1))
        with torch.device("meta"):
            conv = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_one(a.get("stride", 1)),
                       padding=padding, dilation=_one(a.get("dilation", 1)), groups=groups, bias=b is not None)
        conv.weight = weight
        if b is not None:
            conv.bias = self.gm.get_parameter(b.target)
        for u in list(w.users):
            self.replace(u, owner, conv, u.args[0])
        self._drop(w, b)

    def _linear(self, node: fx.Node) -> None:
        a = _bind(node)
        w, b = a["weight"], a.get("bias")
        owner = _owner_of(self.gm, w, b)
        if owner is None or owner in self.modules:
            return
        if not all(u.target is aten.linear.default for u in w.users) or \
                (b is not None and not all(u.target is aten.linear.default and _bind(u).get("bias") is b for u in b.users)) or \
                not all(_bind(u).get("bias") is b for u in w.users):
            return
        self._make_linear(owner, w, b, [(u, _bind(u)["input"]) for u in list(w.users)])

    def _addmm(self, node: fx.Node) -> None:
        a = _bind(node)
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            return
        t = a["mat2"]
        if not (isinstance(t, fx.Node) and len(t.users) == 1 and (
                t.target is aten.t.default or (t.target is aten.permute.default and list(t.args[1]) == [1, 0])
                or (t.target is aten.transpose.int and sorted(_one(t.args[1:3])) in ([0, 1], [-2, -1])))):
            return
        w, b = t.args[0], a["self"]
        owner = _owner_of(self.gm, w, b)
        if owner is None or owner in self.modules or len(w.users) != 1 or len(b.users) != 1:
            return
        bias_val = _val(b)
        if bias_val is not None and bias_val.dim() != 1:
            return
        self._make_linear(owner, w, b, [(node, a["mat1"])])
        self.graph.erase_node(t)
        self._drop(w, b)

    def _make_linear(self, owner: str, w: fx.Node, b: fx.Node | None, calls) -> None:
        weight = self.gm.get_parameter(w.target)
        with torch.device("meta"):
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        lin.weight = weight
        if b is not None:
            lin.bias = self.gm.get_parameter(b.target)
        for call, x in calls:
            self.replace(call, owner, lin, x)
        self._drop(w, b)

    def _batch_norm(self, node: fx.Node) -> None:
        a = _bind(node)
        if node.target is aten.batch_norm.default and a.get("training"):
            return
        legit = node.target is aten._native_batch_norm_legit_no_training.default
        if legit and not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            return
        nodes = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
        if not all(isinstance(n, fx.Node) and n.op == "get_attr" and len(n.users) == 1 for n in nodes):
            return
        owner = nodes[0].target.rsplit(".", 1)[0] if "." in nodes[0].target else ""
        names = ["weight", "bias", "running_mean", "running_var"]
        if not owner or owner in self.modules or [n.target for n in nodes] != [f"{owner}.{k}" for k in names]:
            return
        mod = self.gm.get_submodule(owner)
        if type(mod) is not nn.Module or list(mod.children()) or set(mod._parameters) != {"weight", "bias"} \
                or not {"running_mean", "running_var"} <= set(mod._buffers) <= {"running_mean", "running_var", "num_batches_tracked"}:
            return
        x = a["input"]
        xv = _val(x)
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(xv.dim() if xv is not None else -1)
        if cls is None:
            return
        eps = float(a.get("eps", 1e-5))
        momentum = a.get("momentum", 0.1)
        with torch.device("meta"):
            bn = cls(mod.weight.shape[0], eps=eps, momentum=momentum)
        bn.weight, bn.bias = mod.weight, mod.bias
        bn.running_mean, bn.running_var = mod.running_mean, mod.running_var
        if "num_batches_tracked" in mod._buffers:
            bn.num_batches_tracked = mod.num_batches_tracked
        else:
            bn.register_buffer("num_batches_tracked", None)
        bn.eval()
        if legit:
            for u in list(node.users):
                u.replace_all_uses_with(node)
                self.graph.erase_node(u)
        self.replace(node, owner, bn, x)
        for n in nodes:
            self.graph.erase_node(n)
        for n in list(self.graph.nodes):
            if n.op == "get_attr" and n.target == f"{owner}.num_batches_tracked" and not n.users:
                self.graph.erase_node(n)

    def _drop(self, *attrs) -> None:
        for n in attrs:
            if n is not None and not n.users:
                self.graph.erase_node(n)

    def activations(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in _ACTIVATIONS:
                continue
            a = _bind(node)
            x = a.get("self")
            if not isinstance(x, fx.Node):
                continue
            if node.target in _INPLACE and len(x.users) != 1:
                continue    # other users would see the in-place result
            module = _ACTIVATIONS[node.target](a)
            path = self.paths.claim(self._activation_name(node), "act")
            self.replace(node, path, module, x)

    @staticmethod
    def _activation_name(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        base = re.sub(r"_\d+$", "", node.name).rstrip("_") or node.name
        if stack:
            path, cls = list(stack.values())[-1]
            cls = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
            if path and cls.startswith("torch.nn.modules.") and ".container." not in cls:
                return path
            if path:
                return f"{path}.{base}"
        return node.name

    def fix_batch(self, batch: int) -> None:
        """A static export bakes the example batch into reshapes (`view(x, [2, -1])`); use x's own size."""
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in _RESHAPES or len(node.args) < 2:
                continue
            x, shape = node.args[0], node.args[1]
            xv = _val(x)
            if not (isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], int) and shape[0] == batch
                    and xv is not None and xv.dim() >= 1 and isinstance(xv.shape[0], int) and xv.shape[0] == batch):
                continue
            with self.graph.inserting_before(node):
                size = self.graph.call_function(aten.sym_size.int, (x, 0))
            node.args = (x, [size, *shape[1:]], *node.args[2:])

    def order(self) -> None:
        """get_attr nodes right before their first user, so modules register in execution order."""
        nodes = list(self.graph.nodes)
        out = next(n for n in reversed(nodes) if n.op == "output")
        for n in nodes:
            if n.op != "get_attr":
                continue
            if n.users:
                first = min(n.users, key=lambda u: nodes.index(u))
                first.prepend(n)
            else:
                out.prepend(n)


def load_pt2(path: str | os.PathLike, verify: bool = True) -> tuple[fx.GraphModule, Pt2Source]:
    """A `torch.export` .pt2 file as an eval-mode GraphModule with real Conv/Linear/BatchNorm/activation
    modules under the user's names, plus its `Pt2Source`. With `verify`, the module is checked against
    `ep.module()` on the example input and on a batch one larger (one-line NetmendError if it differs)."""
    path = Path(path)
    ep = _load_program(path)
    try:
        gm = ep.module()
    except Exception as exc:
        raise NetmendError(f"{path}: cannot build a module from the exported program ({type(exc).__name__}: {first_line(exc)})") from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NetmendError(f"{path}: the exported program has {len(placeholders)} inputs; netmend supports models with one input")
    ph = placeholders[0]
    val = ph.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        raise NetmendError(f"{path}: the exported program's input is not a batched tensor")
    dim0 = val.shape[0]
    dynamic = not isinstance(dim0, int)
    example = _example_input(ep, val)
    batch = int(example.shape[0])

    rw = _Rewriter(gm)
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards_fn"):
            gm.graph.erase_node(n)
    if not dynamic:
        rw.fix_batch(batch)
    rw.weight_layers()
    rw.activations()
    rw.order()
    _plain_output(gm.graph)
    gm.graph.lint()
    model = fx.GraphModule(gm, gm.graph, class_name="ExportedModel")
    for name in ep.constants:         # non-persistent buffers / lifted constants stay out of state_dict
        owner, _, leaf = name.rpartition(".")
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        if leaf in mod._buffers:
            mod._non_persistent_buffers_set.add(leaf)
    model.eval()

    if verify:
        _verify(path, ep, model, example, batch, ph.name)
    keys = list(ep.state_dict.keys())
    shape = (-1,) + tuple(int(d) if isinstance(d, int) else -1 for d in val.shape[1:])
    source = Pt2Source(path=path, state_dict_keys=keys, input_name=ph.name, input_shape=shape, example_batch=batch,
                       dynamic_batch=dynamic, sha256=file_sha256(path), constants=sorted(ep.constants))
    return model, source


def _plain_output(graph: fx.Graph) -> None:
    """One input, one tensor out: drop the pytree in/out wrapping export adds (a one-element tuple), so the model
    returns a plain tensor and graph cuts see a straight chain of modules (CARE's fast paths)."""
    out = next(n for n in graph.nodes if n.op == "output")
    ret = out.args[0]
    if isinstance(ret, (tuple, list)) and len(ret) == 1 and isinstance(ret[0], fx.Node):
        if sum(n.op == "placeholder" for n in graph.nodes) != 1:
            return
        out.args = (ret[0],)
        graph._codegen = fx.graph.CodeGen()


def _example_input(ep, val: torch.Tensor) -> torch.Tensor:
    ex = getattr(ep, "example_inputs", None)
    if ex is not None:
        args, kwargs = ex
        flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if len(flat) == 1:
            return flat[0].detach().clone()
    dims = []
    for d in val.shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            hint = getattr(getattr(d, "node", None), "hint", None)
            dims.append(int(hint) if hint is not None else 2)
    g = torch.Generator().manual_seed(0)
    if val.dtype.is_floating_point:
        return torch.randn(*dims, generator=g, dtype=val.dtype)
    return torch.zeros(*dims, dtype=val.dtype)


def _flat(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _flat(v)]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _flat(v)]
    return []


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-5) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            scale = max(float(y.abs().max()) if y.numel() else 0.0, 1.0)
            if not torch.allclose(x.float(), y.float(), rtol=tol, atol=tol * scale):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _verify(path: Path, ep, model: nn.Module, example: torch.Tensor, batch: int, name: str) -> None:
    with torch.no_grad():
        try:
            ref = _flat(ep.module()(example))
        except Exception as exc:
            raise NetmendError(f"{path}: the exported program fails on its own example input "
                               f"({type(exc).__name__}: {first_line(exc)})") from None
        got = _flat(model(example))
        if not _close(got, ref):
            raise NetmendError(f"{path}: netmend's rewrite of the exported program does not reproduce its outputs "
                               "(please report this)")
        bigger = torch.cat([example, example[:1]], 0)
        try:
            out = _flat(model(bigger))
            ok = all(o.shape[0] == batch + 1 for o in out) and _close([o[:batch] for o in out], ref) \
                and _close([o[batch:] for o in out], [r[:1] for r in ref])
        except Exception:
            ok = False
        if not ok:
            raise NetmendError(f"{path}: the exported program only runs with batch size {batch}; export it with "
                               f"dynamic_shapes={{'{name}': {{0: torch.export.Dim('batch')}}}}")


def write_pt2(source: Pt2Source, model: nn.Module, out_path: str | os.PathLike) -> None:
    """Copy every parameter/buffer of `model` into the original ExportedProgram (by FQN) and save it
    to `out_path` atomically; the result loads with `torch.export.load(out).module()`."""
    out_path = Path(out_path)
    src = Path(source.path)
    if not src.is_file():
        raise NetmendError(f"cannot write {out_path}: the original exported program {src} is gone")
    if source.sha256 and file_sha256(src) != source.sha256:
        raise NetmendError(f"cannot write {out_path}: {src} changed since it was loaded; load it again")
    ep = _load_program(src)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    written: dict[int, tuple[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, t in tensors.items():
            if name in ep.state_dict:
                target = ep.state_dict[name]
            elif name in ep.constants and isinstance(ep.constants[name], torch.Tensor):
                target = ep.constants[name]
            else:
                raise NetmendError(f"cannot write {out_path}: tensor {name!r} is not in the exported program {src}")
            if target.shape != t.shape:
                raise NetmendError(f"cannot write {out_path}: {name!r} has shape {tuple(t.shape)}, "
                                   f"the exported program has {tuple(target.shape)}")
            value = t.detach().to(target.device, target.dtype)
            key = target.data_ptr() if target.numel() else id(target)
            if key in written and not torch.equal(written[key][1], value):
                raise NetmendError(f"cannot write {out_path}: {written[key][0]!r} and {name!r} are one tensor in the "
                                   "exported program but now hold different values")
            written[key] = (name, value)
            target.copy_(value)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.stem}.", suffix=".tmp.pt2")
    os.close(fd)
    try:
        with _quiet_export_logs():
            torch.export.save(ep, tmp)
        usual_permissions(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
