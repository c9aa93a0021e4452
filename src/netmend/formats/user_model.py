"""A user's own model in the form they brought it, and back in that form after the repair.

Forms (a registry, one entry each): `FILE.onnx` (any ONNX classifier, converted by netmend),
`FILE.pt2` (a torch.export program), `package.module:factory` with `--weights FILE`. Each names
the file a run folder holds (`model.onnx`, `model.pt2`, `model.safetensors`) and records in
model.json how to reload it, so a run folder is itself a model the CLI accepts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import NetmendError
from ..registry import Registry
from .factory_model import is_factory_spec, load_factory, write_factory_weights


@dataclass(frozen=True)
class ModelForm:
    """How one form loads (spec, weights) -> model and writes a repaired model next to its source."""

    load: Callable[[str, str | None], nn.Module]
    write: Callable[[dict[str, Any], nn.Module, Path], None]
    filename: str                                  # the file a run folder holds


MODEL_FORMS: Registry[ModelForm] = Registry("model form")


def with_input_module(gm: nn.Module) -> nn.Module:
    """A converted graph gets an `nn.Identity` named `input` on the input of its first weight layer (after any
    preprocessing the graph does, e.g. standardisation), registered first: the features that layer reads are then a
    layer like any other, so CARE's `-L inputs=true` can intervene on them and bake its scales into that layer's
    columns. No weights: the model's outputs, state dict and what is written back are unchanged."""
    import torch.fx as fx

    if not isinstance(gm, fx.GraphModule):
        return gm
    first = next((n for n in gm.graph.nodes if n.op == "call_module" and
                  isinstance(gm.get_submodule(n.target), (nn.Linear, nn.Conv1d, nn.Conv2d))), None)
    if first is None or not first.args or not isinstance(first.args[0], fx.Node):
        return gm
    name = "input"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, nn.Identity())
    gm._modules = {name: gm._modules[name], **{k: v for k, v in gm._modules.items() if k != name}}
    feed = first.args[0]
    with gm.graph.inserting_before(first):
        node = gm.graph.call_module(name, (feed,))
    first.replace_input_with(feed, node)
    gm.recompile()
    return gm


def _load_onnx(spec: str, weights: str | None) -> nn.Module:
    from .onnx_model import load_onnx

    return with_input_module(load_onnx(spec)[0])


def _write_onnx(info: dict[str, Any], model: nn.Module, out: Path) -> None:
    from .onnx_model import load_onnx, write_onnx

    write_onnx(load_onnx(info["model_path"])[1], model, out)


def _load_pt2(spec: str, weights: str | None) -> nn.Module:
    from .export_model import load_pt2

    return with_input_module(load_pt2(spec)[0])


def _write_pt2(info: dict[str, Any], model: nn.Module, out: Path) -> None:
    from .export_model import load_pt2, write_pt2

    write_pt2(load_pt2(info["model_path"])[1], model, out)


def _load_factory(spec: str, weights: str | None) -> nn.Module:
    return load_factory(spec, weights)[0]


MODEL_FORMS.add("onnx", ModelForm(_load_onnx, _write_onnx, "model.onnx"),
                "an ONNX classifier; written back with the same graph, names and opset, new weights")
MODEL_FORMS.add("pt2", ModelForm(_load_pt2, _write_pt2, "model.pt2"),
                "a torch.export program (torch.export.save); written back with the same graph, new weights")
MODEL_FORMS.add("factory", ModelForm(_load_factory, lambda info, model, out: write_factory_weights(model, out),
                                     "model.safetensors"),
                "package.module:factory (the user's code) + --weights; written back as safetensors, same keys")


def form_of(spec: str) -> str | None:
    """The form a model argument names, or None (a netmend model folder, a .nnet file ...)."""
    suffix = Path(spec).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "pt2"
    if is_factory_spec(spec):
        return "factory"
    return None


def load_user_model(spec: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, a model.json-style info) for a user's model of any registered form."""
    form = form_of(spec)
    if form is None:
        raise NetmendError(f"{spec}: not a model form netmend reads (FILE.onnx, FILE.pt2, package.module:factory)")
    if weights is not None and form != "factory":
        raise NetmendError(f"--weights applies to package.module:factory models; {Path(spec).name} holds its weights")
    if form != "factory" and not Path(spec).is_file():
        raise NetmendError(f"model file not found: {spec}")
    if form == "factory" and weights is not None and not Path(weights).is_file():
        raise NetmendError(f"weights file not found: {weights}")
    entry = MODEL_FORMS.entry(form)
    model = entry.obj.load(spec, str(weights) if weights is not None else None)
    info: dict[str, Any] = {"model_form": form, "source": spec, "model_path": str(Path(spec).resolve())
                            if form != "factory" else None, "defect": {}}
    if form == "factory":
        info.update({"factory": spec, "weights_source": str(weights) if weights is not None else None})
    return model.eval(), info


def write_user_model(info: dict[str, Any], model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write `model` into the run folder in the form `info` records; return the info for its model.json."""
    form = info["model_form"]
    entry = MODEL_FORMS.entry(form)
    path = Path(folder) / entry.obj.filename
    entry.obj.write(info, model, path)
    out = {k: v for k, v in info.items() if k not in ("metrics",)}
    out.update({"model_file": entry.obj.filename, "parent": info.get("model_path") or info.get("source")})
    return out


def load_run_model(folder: Path, info: dict[str, Any]) -> nn.Module:
    """Reload a repaired user model from its run folder (model.json says which form and file)."""
    form = info["model_form"]
    entry = MODEL_FORMS.entry(form)
    path = Path(folder) / info.get("model_file", entry.obj.filename)
    if not path.is_file():
        raise NetmendError(f"{folder}: the repaired model file {path.name} is missing")
    if form == "factory":
        return load_factory(info["factory"], path)[0]
    model = entry.obj.load(str(path), None)
    return model.eval()
