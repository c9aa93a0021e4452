"""Capture, replace and cut at named layers — the one place every method reaches into a model.

Layers are addressed by dotted names (`model.get_submodule("layer4.1.conv2")`).
"""
from __future__ import annotations

import logging
import operator
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import NetmendError

log = logging.getLogger("netmend")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`, or a one-line error listing a few valid names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hint = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise NetmendError(f"layer {name!r} does not exist in the model; layers: {hint}") from None


def weight_layers(model: nn.Module) -> list[str]:
    """Dotted names of every Linear and Conv2d, in forward-registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module without children, in registration order."""
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def reader_of(model: nn.Module, layer: str, through: tuple[type, ...]) -> tuple[str, nn.Module]:
    """The first Linear or Conv2d registered after the leaf `layer` — the weights that read its output —
    reached only through modules of the types `through` (flatten, pooling, activations...)."""
    leaves = leaf_modules(model)
    names = [n for n, _ in leaves]
    if layer not in names:
        raise NetmendError(f"{layer!r} is not a leaf module, so the weights reading it cannot be found")
    for n, m in leaves[names.index(layer) + 1:]:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return n, m
        if not isinstance(m, through):
            raise NetmendError(f"cannot reach a weight layer after {layer!r} through {n!r} ({type(m).__name__})")
    raise NetmendError(f"no Linear/Conv2d after {layer!r} reads its output")


def input_block(reader: nn.Module, units: int, i: int) -> tuple[slice, slice | int]:
    """Index into `reader.weight` of the inputs fed by unit i of a `units`-unit layer: a conv's input
    channel, or a Linear's block of in_features // units columns (a flattened channel)."""
    if isinstance(reader, nn.Conv2d):
        return slice(None), i
    blk = reader.in_features // units
    if blk * units != reader.in_features:
        raise NetmendError(f"a layer with {units} units cannot feed a Linear taking {reader.in_features} inputs")
    return slice(None), slice(i * blk, (i + 1) * blk)


def add_forward_hook(module: nn.Module, fn: Callable) -> RemovableHandle:
    """Register fn(module, inputs, output) as a forward hook on `module` and return its handle; for a hook that
    outlives one block (the caller removes it, or it lives as long as the module). Prefer `forward_hook`."""
    return module.register_forward_hook(fn)


def add_pre_hook(module: nn.Module, fn: Callable) -> RemovableHandle:
    """Register fn(module, inputs) as a forward pre-hook on `module` and return its handle (see `add_forward_hook`).
    Prefer `pre_hook`."""
    return module.register_forward_pre_hook(fn)


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Within the block, each fn(module, inputs, output) of the (module, fn) pairs is a forward hook on its module
    (registered in the given order); every handle is removed on exit, also after an exception."""
    handles: list[RemovableHandle] = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def forward_hook(module: nn.Module, fn: Callable) -> Iterator[None]:
    """Within the block, fn(module, inputs, output) is a forward hook on `module` (removed on exit)."""
    with forward_hooks([(module, fn)]):
        yield


@contextmanager
def pre_hook(module: nn.Module, fn: Callable) -> Iterator[None]:
    """Within the block, fn(module, inputs) is a forward pre-hook on `module` (removed on exit, also after an
    exception)."""
    handle = module.register_forward_pre_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Dotted names of the weight modules in the order a forward pass runs them (one sample, on the model's device)."""
    param = next(model.parameters(), None)
    x = x[:1].to(param.device) if param is not None else x[:1]
    order: list[str] = []
    hooks = [(get_layer(model, n), lambda *_a, _n=n: order.append(_n) if _n not in order else None)
             for n in weight_layers(model)]
    with forward_hooks(hooks), torch.no_grad():
        model(x)
    return order


class Capture:
    """What a capture saw: inputs[name] (first positional input) and outputs[name]."""

    def __init__(self):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}


@contextmanager
def capture(model: nn.Module, names: list[str] | str, detach: bool = True) -> Iterator[Capture]:
    """Record the input and output of the named layers during forward passes inside the block."""
    names = [names] if isinstance(names, str) else list(names)
    cap = Capture()
    handles = []
    for name in names:
        layer = get_layer(model, name)

        def hook(_m, inp, out, _name=name):
            x = inp[0] if isinstance(inp, tuple) and inp else inp
            cap.inputs[_name] = x.detach() if detach and torch.is_tensor(x) else x
            cap.outputs[_name] = out.detach() if detach and torch.is_tensor(out) else out

        handles.append(layer.register_forward_hook(hook))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replace_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the named layer's output is replaced by fn(output)."""
    layer = get_layer(model, name)
    handle = layer.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


def run_to(model: nn.Module, name: str, x: torch.Tensor, which: str = "output") -> torch.Tensor:
    """Run the model only up to the named layer and return its output (or input)."""
    layer = get_layer(model, name)

    def hook(_m, inp, out):
        raise _Stop(out if which == "output" else (inp[0] if isinstance(inp, tuple) else inp))

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop as stop:
        return stop.value
    finally:
        handle.remove()
    raise NetmendError(f"layer {name!r} was not reached in the forward pass")


def split_sequential(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module] | None:
    """For a model whose top level is an nn.Sequential and `name` a direct child, return
    (prefix up to and including `name`, suffix after it). None when the model is not so simple."""
    if not isinstance(model, nn.Sequential) or "." in name:
        return None
    names = [n for n, _ in model.named_children()]
    if name not in names:
        return None
    i = names.index(name)
    children = list(model.named_children())
    return nn.Sequential(OrderedDict(children[: i + 1])), nn.Sequential(OrderedDict(children[i + 1:]))


# ----------------------------------------------------------------------------- cutting any model (torch.fx)

FALLBACK = "CARE falls back to rerunning the whole model per intervention"

_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                  operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                  operator.imatmul, operator.setitem}


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _inplace(node, root: nn.Module) -> bool:
    """True when the node may write into its first argument (x.add_(..), F.relu(.., inplace=True), ReLU(inplace))."""
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCS or node.kwargs.get("inplace"):
            return True
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        try:
            return bool(getattr(_attr(root, node.target), "inplace", False))
        except AttributeError:
            return True
    return False


def _prune(gm) -> None:
    """Drop nodes whose value nobody uses (a prefix needs only what leads to h and the carried values);
    anything that may write in place or has side effects stays."""
    changed = False
    for n in reversed(list(gm.graph.nodes)):
        if n.op in ("placeholder", "output") or n.users or _inplace(n, gm):
            continue
        try:
            impure = n.is_impure()
        except Exception:                      # noqa: BLE001 — unknown: keep it
            impure = True
        if not impure:
            gm.graph.erase_node(n)
            changed = True
    if changed:
        gm.recompile()


def _as_module(node, root: nn.Module) -> nn.Module | None:
    """The node as a one-input module (the model's own for call_module; flatten/relu calls as fresh ones)."""
    import torch.nn.functional as F

    if node.op == "call_module":
        return _attr(root, node.target)
    rest, kw = tuple(node.args[1:]), dict(node.kwargs)
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method"
                                                                        and node.target == "flatten"):
        start = rest[0] if len(rest) > 0 else kw.pop("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kw.pop("end_dim", -1)
        return nn.Flatten() if not kw and len(rest) <= 2 and start == 1 and end == -1 else None
    if ((node.op == "call_function" and node.target in (torch.relu, F.relu)) or
            (node.op == "call_method" and node.target == "relu")) and not rest and not kw.get("inplace"):
        return nn.ReLU()
    return None


class Split:
    """A model cut after one layer's output by torch.fx (built by `split_at`).

    `prefix(x)` → (h, *carried): the layer's output h and every row-wise value computed before the cut that the
    rest of the graph still needs (skip connections: for a cut inside a residual block, the block's input);
    `suffix(h, *carried)` → the model's output. Both halves call the model's own submodules and read its own
    Parameter tensors (nothing is copied), so an edit to the model is seen by the split and vice versa.
    `run_suffix` takes h with k·N rows (k intervened or scaled copies of the N rows, copy-major, as
    `h.repeat(k, ...)` lays them out) for carried values of N rows, tiling them; extra leading batch
    dimensions of h (k, N, ...) are flattened and restored."""

    def __init__(self, layer: str, prefix, suffix, carried: tuple[str, ...], out_spec, chain, position: dict,
                 suffix_layers: set, refs: dict, mutated: tuple[int, ...]):
        self.layer, self.prefix, self.suffix = layer, prefix, suffix
        self.carried = carried                    # names of the values carried across the cut
        self.out_spec = out_spec                  # torch.export-style output structure (or None)
        self.chain = chain                        # the suffix as a list of one-input modules when it takes h only
        self.position = position                  # module name → its order among the traced module calls
        self.suffix_layers = suffix_layers        # modules called after the cut
        self.refs = refs                          # target → the object the split uses (staleness check)
        self.mutated = mutated                    # suffix inputs written in place (0 = h): run on copies
        self.verified = False
        self.h_ndim: int | None = None

    def fresh(self, model: nn.Module) -> bool:
        """The model still holds the very submodules / tensors the split calls (none was replaced)."""
        try:
            return all(_attr(model, t) is o for t, o in self.refs.items())
        except AttributeError:
            return False

    def run_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = self.prefix(x)
        h, carried = out[0], tuple(out[1:])
        n = len(x)
        for v in (h, *carried):
            if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != n:
                what = type(v).__name__ if not torch.is_tensor(v) else f"a tensor of shape {tuple(v.shape)}"
                raise NetmendError(f"a value crossing the cut at {self.layer!r} is {what}, not one row per input")
        self.h_ndim = h.dim()
        return h, carried

    def run_suffix(self, h: torch.Tensor, carried: tuple[torch.Tensor, ...] = ()):
        carried = tuple(carried)
        if len(carried) != len(self.carried):
            raise NetmendError(f"the cut at {self.layer!r} needs {len(self.carried)} carried values "
                               f"({', '.join(self.carried)}), got {len(carried)}")
        lead = None
        if self.h_ndim is not None and h.dim() > self.h_ndim:
            lead = h.shape[: h.dim() - self.h_ndim + 1]
            h = h.reshape(-1, *h.shape[len(lead):])
        if carried:
            n = carried[0].shape[0]
            if h.shape[0] != n:
                k = h.shape[0] // n if n else 0
                if k * n != h.shape[0] or k == 0:
                    raise NetmendError(f"cut at {self.layer!r}: {h.shape[0]} rows of h for {n} rows of carried values")
                carried = tuple(c.repeat(k, *([1] * (c.dim() - 1))) for c in carried)
            elif self.mutated:
                carried = tuple(c.clone() if i + 1 in self.mutated else c for i, c in enumerate(carried))
        if 0 in self.mutated:
            h = h.clone()
        out = self.suffix(h, *carried)
        if self.out_spec is not None:
            import torch.utils._pytree as pytree

            out = pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self.out_spec)
        if lead is not None and torch.is_tensor(out):
            out = out.reshape(*lead, *out.shape[1:])
        return out

    def verify(self, model: nn.Module, x: torch.Tensor) -> str | None:
        """None when the two halves reproduce model(x) on a few rows of x, else why not (one line)."""
        xs = x[:4]
        with torch.no_grad():
            try:
                got = self.run_suffix(*self.run_prefix(xs))
            except Exception as e:           # noqa: BLE001 — any failure means: do not use the split
                return f"the cut at {self.layer!r} does not run ({_one_line(e)}); {FALLBACK}"
            if not model.training:            # dropout / batch statistics would differ (and update) in training mode
                ref = model(xs)
                import torch.utils._pytree as pytree

                a, b = pytree.tree_leaves(got), pytree.tree_leaves(ref)
                ok = len(a) == len(b)
                for u, v in zip(a, b):
                    if torch.is_tensor(u) and torch.is_tensor(v):
                        ok = ok and u.shape == v.shape and bool(
                            ((u.float() - v.float()).abs().max() if u.numel() else torch.tensor(0.0))
                            <= 1e-4 * (1 + float(v.float().abs().max() if v.numel() else 0.0)))
                    else:
                        ok = ok and u == v
                if not ok:
                    return (f"the graph traced from {type(model).__name__}.forward does not reproduce its output; "
                            f"{FALLBACK}")
        self.verified = True
        return None


class _CutTracer(fx.Tracer):
    """symbolic_trace that keeps every childless module (and the cut layer) as one call_module node, so forward
    hooks on them still fire in the split, and traces into the modules on the way to the cut layer."""

    def __init__(self, keep: str):
        super().__init__()
        self.keep = keep

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname == self.keep:
            return True
        if self.keep.startswith(qualname + ".") or isinstance(m, fx.GraphModule):
            return False
        return next(iter(m.children()), None) is None or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, layer: str):
    import inspect

    if isinstance(model, fx.GraphModule):
        return model.graph
    concrete = {}
    try:                       # netmend calls model(x): specialise the other arguments to their defaults
        params = list(inspect.signature(model.forward).parameters.values())[1:]
        concrete = {p.name: p.default for p in params if p.default is not p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    except (TypeError, ValueError):
        pass
    name = f"{type(model).__name__}.forward"
    try:
        return _CutTracer(layer).trace(model, concrete_args=concrete or None)
    except fx.proxy.TraceError as e:
        msg = str(e)
        if "control flow" in msg or "iterate" in msg or "bool" in msg.lower():
            raise NetmendError(f"{name} has data-dependent control flow; {FALLBACK}") from None
        raise NetmendError(f"{name} cannot be traced by torch.fx ({_one_line(e)}); {FALLBACK}") from None
    except Exception as e:     # noqa: BLE001 — anything tracing raises means: no split
        raise NetmendError(f"{name} cannot be traced by torch.fx ({type(e).__name__}: {_one_line(e)}); "
                           f"{FALLBACK}") from None


def _cut_node(graph, layer: str):
    """The node whose value is the layer's output: its only call_module node, or (torch.export graphs, whose
    modules are inlined) the one node of the layer's scope that is used outside it."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) == 1:
        return calls[0]
    if calls:
        raise NetmendError(f"layer {layer!r} is called {len(calls)} times in the forward pass; {FALLBACK}")
    def in_scope(n) -> bool:
        stack = (n.meta.get("nn_module_stack") or {}).values()
        return n.op != "call_module" and any(isinstance(v, tuple) and v and v[0] == layer for v in stack)

    scope = [n for n in graph.nodes if in_scope(n)]
    inside = set(scope)
    outs = [n for n in scope if any(u not in inside for u in n.users)]
    if len(outs) == 1 and scope[-1] is outs[0]:
        return outs[0]
    raise NetmendError(f"layer {layer!r} is not called as one module in the traced graph; {FALLBACK}")


def _build_split(model: nn.Module, layer: str) -> Split:
    graph = _trace(model, layer)
    node = _cut_node(graph, layer)
    nodes = list(graph.nodes)
    i = nodes.index(node)
    before, after = nodes[: i + 1], nodes[i + 1:]
    if any(n.op == "placeholder" for n in after):
        raise NetmendError(f"the traced graph reads an input after {layer!r}; {FALLBACK}")
    rowdep: set = set()                       # values computed from the inputs (per row), not from weights alone
    for n in nodes:
        if n.op == "placeholder" or any(a in rowdep for a in n.all_input_nodes):
            rowdep.add(n)
    if node not in rowdep:
        raise NetmendError(f"the output of {layer!r} does not depend on the model's input; {FALLBACK}")
    in_before = set(before)
    carried = []
    for n in after:
        for a in n.all_input_nodes:
            if a in in_before and a is not node and a in rowdep and a not in carried:
                carried.append(a)
    # prefix: x → (h, *carried)
    pg = fx.Graph()
    env: dict = {}
    for n in before:
        env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output((env[node], *[env[c] for c in carried]))
    prefix = fx.GraphModule(model, pg, class_name="Prefix")
    _prune(prefix)
    # suffix: (h, *carried) → output; weight-only values computed before the cut are recomputed here
    sg = fx.Graph()
    senv: dict = {node: sg.placeholder("h")}
    for c in carried:
        senv[c] = sg.placeholder(f"carried_{c.name}")

    def arg(a):
        if a not in senv:
            senv[a] = sg.node_copy(a, arg)
        return senv[a]

    for n in after:
        if n.op == "output":
            sg.output(fx.node.map_arg(n.args[0], arg))
        else:
            senv[n] = sg.node_copy(n, arg)
    suffix = fx.GraphModule(model, sg, class_name="Suffix")
    _prune(suffix)
    placeholders = [n for n in suffix.graph.nodes if n.op == "placeholder"]
    mutated = tuple(sorted({placeholders.index(n.args[0]) for n in suffix.graph.nodes
                            if n.args and n.args[0] in placeholders and _inplace(n, suffix)}))
    codegen = getattr(graph, "_codegen", None)
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    chain = None
    if not carried and out_spec is None:
        chain = _chain(suffix)
    position = {n.target: k for k, n in enumerate(n for n in nodes if n.op == "call_module")}
    suffix_layers = {n.target for n in suffix.graph.nodes if n.op == "call_module"}
    refs = {n.target: _attr(model, n.target) for gm in (prefix, suffix) for n in gm.graph.nodes
            if n.op in ("call_module", "get_attr")}
    return Split(layer, prefix, suffix, tuple(c.name for c in carried), out_spec, chain, position, suffix_layers,
                 refs, mutated)


def _chain(gm) -> list[nn.Module] | None:
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    prev, mods = nodes[0], []
    for n in nodes[1:]:
        if n.op == "output":
            return mods if n.args[0] is prev else None
        if len(prev.users) != 1 or n.all_input_nodes != [prev] or not n.args or n.args[0] is not prev:
            return None
        m = _as_module(n, gm)
        if m is None:
            return None
        mods.append(m)
        prev = n
    return None


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[Split | None, str | None]]]" = \
    weakref.WeakKeyDictionary()


def split_at(model: nn.Module, layer: str) -> tuple[Split | None, str | None]:
    """(Split, None) cutting any model after `layer` (see `Split`), or (None, a one-line reason) when torch.fx
    cannot (data-dependent control flow, a layer called twice...; the reason is logged once, logger "netmend").

    A torch.fx.GraphModule is cut in its own graph; any other model is traced with `torch.fx.symbolic_trace`
    semantics (childless modules and the layer stay module calls). Splits are cached per (model, layer) and
    rebuilt only when the model no longer holds a submodule or tensor the split calls; parameters are shared,
    so weight edits need no invalidation."""
    get_layer(model, layer)
    per = _SPLITS.get(model)
    if per is None:
        per = _SPLITS[model] = {}
    hit = per.get(layer)
    if hit is not None and (hit[0] is None or hit[0].fresh(model)):
        return hit
    try:
        res: tuple[Split | None, str | None] = (_build_split(model, layer), None)
    except NetmendError as e:
        res = (None, str(e))
    except Exception as e:       # noqa: BLE001 — an fx corner case: fall back, say why
        res = (None, f"cannot cut {type(model).__name__} at {layer!r} with torch.fx ({type(e).__name__}: "
                     f"{_one_line(e)}); {FALLBACK}")
    per[layer] = res
    if res[1]:
        log.warning(res[1])
    return res


def unsplittable(model: nn.Module, layer: str, reason: str) -> None:
    """Record (and log) that the split of `model` at `layer` must not be used: it failed its check."""
    per = _SPLITS.get(model)
    if per is None:
        per = _SPLITS[model] = {}
    per[layer] = (None, reason)
    log.warning(reason)


def carried_at(model: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The values besides the layer's output that `run_from(model, name, ..)` needs for inputs x (compute them
    once, pass them as `carried` to several run_from calls); None when the model is not cut by torch.fx."""
    if split_sequential(model, name) is not None:
        return None
    split, _ = split_at(model, name)
    if split is None or not split.carried:
        return None
    if not split.verified:
        why = split.verify(model, x)
        if why:
            unsplittable(model, name, why)
            return None
    with torch.no_grad():
        return split.run_prefix(x)[1]


def run_from(model: nn.Module, name: str, value: torch.Tensor, x: torch.Tensor | None = None,
             carried: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Output of the model when the named layer's output is `value`.

    Sequential models are cut (no prefix computation); any other model is cut by torch.fx (`split_at`): only
    the values a skip connection carries across the cut are computed from `x` (or taken from `carried`, see
    `carried_at`). Models torch.fx cannot cut need `x`: its prefix is computed and then overridden at `name`
    (exact for any architecture)."""
    split = split_sequential(model, name)
    if split is not None:
        return split[1](value)
    graph, _ = split_at(model, name)
    if graph is not None and x is not None and not graph.verified:
        why = graph.verify(model, x)
        if why:
            unsplittable(model, name, why)
            graph = None
    if graph is not None and (not graph.carried or carried is not None or x is not None):
        if graph.carried and carried is None:
            with torch.no_grad():
                carried = graph.run_prefix(x)[1]
        return graph.run_suffix(value, carried or ())
    if x is None:
        raise NetmendError(f"cannot cut the model at {name!r} without its input; pass x")
    with replace_output(model, name, lambda _out: value):
        return model(x)
