"""Capture, replace and cut at named layers — the one place every method reaches into a model.

Layers are addressed by dotted names (`model.get_submodule("layer4.1.conv2")`).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import NetmendError


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


def run_from(model: nn.Module, name: str, value: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Output of the model when the named layer's output is `value`.

    Sequential models are cut (no prefix computation); other models need the input `x`, whose
    prefix is computed and then overridden at `name` (exact for any architecture)."""
    split = split_sequential(model, name)
    if split is not None:
        return split[1](value)
    if x is None:
        raise NetmendError(f"cannot cut the model at {name!r} without its input; pass x")
    with replace_output(model, name, lambda _out: value):
        return model(x)
