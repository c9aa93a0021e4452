"""The user's own code: `package.module:factory` returns the nn.Module, `--weights FILE` fills it.

Importing the module is the user's explicit choice (it runs their code, from the current folder);
weights are read without unpickling code: safetensors, or `torch.load(weights_only=True)`.
The repaired weights are written back as safetensors under the same keys, so
`factory().load_state_dict(safetensors.torch.load_file(...))` loads them.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import NetmendError

SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_factory_spec(text: str) -> bool:
    """`pkg.module:make` (and not a path that happens to hold a colon, such as C:\\model.onnx)."""
    return bool(SPEC.match(text)) and not Path(text).exists()


@dataclass
class FactorySource:
    """Where a factory model came from, so a run folder can be reloaded the same way."""

    spec: str
    weights: str | None
    keys: list[str]

    def to_json(self) -> dict:
        return {"format": "factory", "factory": self.spec, "weights_source": self.weights}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _import(spec: str):
    module_name, attr = spec.split(":", 1)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise NetmendError(f"{spec}: module {module_name!r} not found (looked in {cwd} and the installed "
                               f"packages)") from None
        raise NetmendError(f"{spec}: importing {module_name} failed: {_one_line(exc)}") from None
    except Exception as exc:  # the user's module raised while importing
        raise NetmendError(f"{spec}: importing {module_name} failed: {_one_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NetmendError(f"{spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file (a dict holding 'state_dict' is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise NetmendError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise NetmendError(f"{path} is corrupt or not a safetensors file ({_one_line(exc)})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for a full pickle, RuntimeError / EOFError for a corrupt file
        raise NetmendError(f"{path}: cannot read weights safely (torch.load weights_only=True: {_one_line(exc)}); "
                           f"save a state dict, or use safetensors") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NetmendError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def load_factory(spec: str, weights: str | os.PathLike | None) -> tuple[nn.Module, FactorySource]:
    """(the user's model with `weights` loaded, in eval mode; where it came from)."""
    if not SPEC.match(spec):
        raise NetmendError(f"{spec!r} is not a factory: expected package.module:function")
    factory = _import(spec)
    if not callable(factory):
        raise NetmendError(f"{spec} is not callable (a function or class that returns the nn.Module)")
    try:
        model = factory()
    except Exception as exc:
        raise NetmendError(f"{spec}() failed: {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise NetmendError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = read_state_dict(weights)
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
            raise NetmendError(f"{weights}: keys do not match {spec}(): " + "; ".join(parts))
        wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if wrong:
            k = wrong[0]
            raise NetmendError(f"{weights}: {k} has shape {tuple(state[k].shape)}, {spec}() expects {tuple(own[k].shape)}")
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NetmendError(f"{weights}: parameter {bad[0]} contains NaN or infinite values")
        model.load_state_dict(state, strict=True)
    return model.eval(), FactorySource(spec, str(weights) if weights is not None else None, list(model.state_dict()))


def write_factory_weights(model: nn.Module, out_path: str | os.PathLike) -> None:
    """The model's state dict under the user's own keys, as safetensors (atomic)."""
    from safetensors.torch import save_file

    from ..edit import atomic_write

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(out_path, lambda tmp: save_file(state, tmp))
