"""Channels-last memory layout for the bulk inference passes (evaluation, probes, key statistics).

On a CPU, PyTorch's max-pooling of an N×C×H×W tensor is about nine times slower than the same pooling on the
channels-last layout (measured: 512×32×28×28, one thread, 0.153 s against 0.017 s), and a small CNN's forward pass
spends most of its time there: the Fashion-MNIST small CNN runs 6 000 images in 4.6 s as it is and in 2.4 s with
its conv weights stored channels-last (benchmarks/results/speed.md). A layout changes where the numbers sit in
memory, not what they are, but the convolution kernels for the two layouts sum in a different order: logits differ
in the last bits (≤ 6e-6 on that model), so a prediction exactly on a tie could differ.

`fast_layout(model, example)` stores every Conv2d weight of the model, and its image inputs, channels-last for the
length of a block and puts the original layout back afterwards — the same Parameter objects, so hooks, optimisers and edits are
untouched. A model that cannot run that way (a user's `x.view(...)` after a conv needs contiguous activations)
or whose predictions on `example` would change is left as it is; the verdict is kept per model object.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .hooks import pre_hook

_VERDICT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
MIN_BATCH = 256          # below this many inputs the two layout conversions are not worth it


def _convs(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight is not None
            and m.weight.dim() == 4]


def _channels_last_copy(t: torch.Tensor) -> torch.Tensor:
    """t with channels-last strides, also where its layout is ambiguous (one channel), as Module.to does."""
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


def _inputs_channels_last(_module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The model's image inputs channels-last too: a one-channel image's layout is otherwise ambiguous and the
    first conv's output (the largest activation, where the first pooling runs) would stay N×C×H×W."""
    return tuple(_channels_last_copy(a) if torch.is_tensor(a) and a.dim() == 4 else a for a in inputs)


@contextmanager
def _channels_last(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    originals = [w.data for w in weights]
    with torch.no_grad():
        for w in weights:
            w.data = _channels_last_copy(w.data)
    try:
        with pre_hook(model, _inputs_channels_last):
            yield
    finally:
        with torch.no_grad():
            for w, orig in zip(weights, originals):
                w.data = orig.copy_(w.data)     # the original storage and strides, holding the values as they stand


def _works(model: nn.Module, weights: list[nn.Parameter], example: torch.Tensor) -> bool:
    """Does the model run channels-last on `example` with the same predictions and logits within 1e-4 (scaled)?"""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(example)
            with _channels_last(model, weights):
                out = model(example)
    except Exception:            # any failure (e.g. a .view on channels-last activations): keep the model's layout
        return False
    finally:
        model.train(was_training)
    if not (torch.is_tensor(ref) and torch.is_tensor(out) and ref.shape == out.shape and ref.dim() == 2):
        return False
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    return bool((ref.argmax(1) == out.argmax(1)).all()) and float((ref - out).abs().max()) <= tol


@contextmanager
def fast_layout(model: nn.Module, example: torch.Tensor | None, n: int | None = None) -> Iterator[None]:
    """Within the block the model's conv weights are channels-last, where that helps and is safe: a model with a
    Conv2d, image inputs (`example`: a few of them, N×C×H×W) and `n` (the number of inputs the block will run,
    when known) at least MIN_BATCH. Restores the original layout on exit, also on an error."""
    weights = _convs(model)
    use = (bool(weights) and example is not None and example.dim() == 4 and len(example) > 0
           and (n is None or n >= MIN_BATCH) and all(w.is_contiguous() for w in weights))
    if use:
        verdict = _VERDICT.get(model)
        if verdict is None:
            dev = weights[0].device
            verdict = _works(model, weights, example[:2].to(dev))
            _VERDICT[model] = verdict
        use = verdict
    if not use:
        yield
        return
    with _channels_last(model, weights):
        yield
