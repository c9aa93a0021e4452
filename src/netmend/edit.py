"""Edit: a repair as data — parameter deltas that can be applied, reverted, saved and inspected.

A repaired model is the original plus an Edit. `apply` keeps an exact copy of every touched
parameter so `revert` restores it bit for bit (adding then subtracting a float delta would not). The copies live
beside the value, keyed by (model, edit) and dropped with either, so an Edit is only its deltas and metadata and one
Edit can be applied to several models at once.
"""
from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import NetmendError


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors


# model -> edit -> {parameter name: its exact value before the edit was applied}
_SAVED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()
# model -> structural edit -> the modules it replaced
_SAVED_MODULES: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()
CHAIN = "chain:"          # edit.safetensors keys of a structural edit's layers (no parameter name has a colon)


def rebuild_chain(model: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> "OrderedDict[str, nn.Module]":
    """Replace a flat Linear/ReLU Sequential's modules, in place, by a chain with these layers; returns the old
    modules. Names follow the model's own: fc1, relu1, … (netmend's ACAS Xu networks) or 0, 1, …"""
    mods = list(model.children()) if isinstance(model, nn.Sequential) else []
    if not mods or not all(isinstance(m, (nn.Linear, nn.ReLU)) for m in mods):
        raise NetmendError("this edit replaces a Linear/ReLU nn.Sequential; the model is not one")
    old = OrderedDict(model._modules)
    named = any(not n.isdigit() for n in old)
    ref = next(m for m in mods if isinstance(m, nn.Linear)).weight
    new: "OrderedDict[str, nn.Module]" = OrderedDict()
    for i, (w, b) in enumerate(layers, 1):
        fc = nn.Linear(w.shape[1], w.shape[0], device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            fc.weight.copy_(w)
            fc.bias.copy_(b)
        new[f"fc{i}" if named else str(len(new))] = fc
        if i < len(layers):
            new[f"relu{i}" if named else str(len(new))] = nn.ReLU()
    model._modules.clear()
    model._modules.update(new)
    return old


def saved_values(model: nn.Module, edit: "Edit") -> dict[str, torch.Tensor]:
    """The exact values `edit.apply(model)` saved for `revert` (empty when none are held)."""
    return _SAVED.get(model, {}).get(edit, {})


@dataclass(eq=False)
class Edit:
    """Additive parameter deltas {parameter name: ΔW}, plus free-form metadata (JSON-able). Compared by identity."""

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # A structural edit (repair/property_patch.py): the flat Linear/ReLU chain is replaced by these (weight, bias)
    # layers — wider, deeper, with every original weight inside. `apply` swaps the modules in place, `revert` puts
    # the very same module objects back.
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def between(before: nn.Module | dict[str, torch.Tensor], after: nn.Module, meta: dict | None = None,
                names: list[str] | None = None) -> "Edit":
        """The Edit that turns `before` into `after` (only parameters that changed are kept)."""
        b = before if isinstance(before, dict) else _named_tensors(before)
        a = _named_tensors(after)
        deltas = {}
        for name in names or list(a):
            if name in b and a[name].is_floating_point():
                d = (a[name].detach() - b[name].detach().to(a[name].device)).cpu()
                if torch.any(d != 0):
                    deltas[name] = d.clone()
        return Edit(deltas, dict(meta or {}))

    def merge(self, other: "Edit") -> "Edit":
        """Sum of two edits (used by methods that edit in rounds). A structural edit replaces the network's layers:
        there is no sum to take with it, so merging one is refused instead of dropping its layers."""
        if self.layers is not None or other.layers is not None:
            raise NetmendError("a structural edit (new layers) cannot be merged with another edit: apply one, then "
                               "repair the result")
        deltas = {k: v.clone() for k, v in self.deltas.items()}
        for k, v in other.deltas.items():
            deltas[k] = deltas[k] + v if k in deltas else v.clone()
        meta = dict(self.meta)
        meta.setdefault("parts", []).append(other.meta)
        return Edit(deltas, meta)

    @property
    def parameters(self) -> list[str]:
        return sorted(self.deltas)

    def num_changed(self) -> int:
        """Weights changed; a structural edit counts the parameters it added (it changes no original one)."""
        added = int(self.meta.get("added_parameters", 0)) if self.layers is not None else 0
        return int(sum(int((d != 0).sum()) for d in self.deltas.values())) + added

    def norms(self, model: nn.Module | dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        """‖ΔW‖_F per parameter and, given the model (or its tensors by name), relative to ‖W‖_F."""
        params = model if isinstance(model, dict) else _named_tensors(model) if model is not None else {}
        out = {}
        for k, d in self.deltas.items():
            entry = {"fro": float(d.float().norm()), "changed": int((d != 0).sum())}
            if k in params:
                w = params[k].detach().float().norm()
                entry["relative"] = float(d.float().norm() / w) if w > 0 else float("inf")
            out[k] = entry
        return out

    def apply(self, model: nn.Module) -> nn.Module:
        """Add the deltas to `model` in place (exact backup kept for revert)."""
        if self.layers is not None:
            _SAVED_MODULES.setdefault(model, weakref.WeakKeyDictionary())[self] = rebuild_chain(model, self.layers)
        params = _named_tensors(model)
        missing = [k for k in self.deltas if k not in params]
        if missing:
            raise NetmendError(f"edit refers to parameters the model does not have: {missing[:3]}")
        for k, d in self.deltas.items():
            p = params[k]
            if p.shape != d.shape:
                raise NetmendError(f"edit for {k} has shape {tuple(d.shape)}, model has {tuple(p.shape)}")
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for k, d in self.deltas.items():
                    p = params[k]
                    value = p.detach().clone()
                    p.add_(d.to(p.device, p.dtype))
                    saved[k] = value
        except BaseException:                 # half applied (e.g. out of device memory): put back what was changed
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)
            raise
        _SAVED.setdefault(model, weakref.WeakKeyDictionary())[self] = saved
        return model

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """`with edit.applied(model):` the deltas are in place inside the block and reverted, bit for bit, on
        leaving it — on an exception too, so a failed trial never leaves a half-edited model behind."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo `apply`: restore the exact saved values, or subtract the deltas if none were saved."""
        if self.layers is not None:
            old = _SAVED_MODULES.get(model, {}).pop(self, None)
            if old is None:
                raise NetmendError("a structural edit can only be reverted on the model it was applied to")
            model._modules.clear()
            model._modules.update(old)
            return model
        params = _named_tensors(model)
        saved = _SAVED.get(model, {}).pop(self, {})
        with torch.no_grad():
            for k, d in self.deltas.items():
                if k in saved:
                    params[k].copy_(saved[k])
                else:
                    params[k].sub_(d.to(params[k].device, params[k].dtype))
        return model

    def save(self, path: str | os.PathLike) -> None:
        """Write deltas as safetensors with the metadata as JSON in the header (atomic). The same edit gives the
        same bytes: wall-clock times (keys `seconds`, `*_seconds`) stay out of the header (metrics.json has them),
        and NaN / Infinity are written as null."""
        from .jsonsafe import json_safe

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.deltas.items()}
        for i, (w, b) in enumerate(self.layers or []):
            tensors[f"{CHAIN}{i}.weight"], tensors[f"{CHAIN}{i}.bias"] = w.detach().cpu().contiguous(), \
                b.detach().cpu().contiguous()
        meta = json.dumps(json_safe(_timeless(self.meta), default=str)[0], allow_nan=False)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"netmend_edit": meta}))

    @staticmethod
    def load(path: str | os.PathLike) -> "Edit":
        path = Path(path)
        if not path.is_file():
            raise NetmendError(f"edit file not found: {path}")
        try:
            deltas = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("netmend_edit", "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise NetmendError(f"cannot read edit file {path}: {exc}") from None
        n = sum(1 for k in deltas if k.startswith(CHAIN))
        try:
            layers = [(deltas.pop(f"{CHAIN}{i}.weight"), deltas.pop(f"{CHAIN}{i}.bias")) for i in range(n // 2)] or None
        except KeyError as exc:
            raise NetmendError(f"edit file {path}: its chain layers are incomplete (no {exc.args[0]})") from None
        if n % 2 or any(k.startswith(CHAIN) for k in deltas):
            raise NetmendError(f"edit file {path}: its chain layers are incomplete")
        return Edit(deltas, meta, layers)


def _timeless(o: Any) -> Any:
    """`o` without wall-clock entries (keys `seconds` or ending in `_seconds`), at any depth."""
    if isinstance(o, dict):
        return {k: _timeless(v) for k, v in o.items()
                if not (isinstance(k, str) and (k == "seconds" or k.endswith("_seconds")))}
    if isinstance(o, (list, tuple)):
        return [_timeless(v) for v in o]
    return o


def usual_permissions(path: str | os.PathLike) -> None:
    """The permissions a plain open() / mkdir() would have given (0666 / 0777 less the umask): mkstemp and
    mkdtemp make private 0600 / 0700 temporaries, which must not become the user's output files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Call writer(tmp_path) then rename onto `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        usual_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
