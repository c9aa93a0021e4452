"""Model folders: `model.safetensors` + `model.json` (architecture, data, defect, training, metrics).

Loading never unpickles (safetensors only); saving is atomic and never overwrites a model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .edit import atomic_write
from .errors import NetmendError

WEIGHTS, INFO = "model.safetensors", "model.json"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    def writer(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")

    atomic_write(path, writer)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_fresh_out(out: str | os.PathLike) -> Path:
    """An --out folder must not exist yet or be empty: nothing of the user's is ever overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NetmendError(f"--out {out} exists and is not a folder")
    if any((out / name).exists() for name in (WEIGHTS, INFO, "model.onnx", "model.pt2")):
        raise NetmendError(f"--out {out} already holds a model; choose a new folder")
    if out.is_dir():
        first = next(iter(sorted(p.name for p in out.iterdir())), None)
        if first is not None:
            raise NetmendError(f"--out {out} already holds files ({first}); choose a new or empty folder")
    return out


@contextmanager
def fresh_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Build a folder whole or not at all: files go into a hidden sibling, renamed into place at the end; on any
    error or interruption the sibling is removed and `out` is left as it was."""
    out = check_fresh_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        check_fresh_out(out)                       # nothing appeared there meanwhile
        if out.is_dir():
            out.rmdir()                            # empty (checked): the finished folder takes its place
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model_folder(out: str | os.PathLike, model: nn.Module, info: dict[str, Any]) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with fresh_folder(out) as tmp:
        atomic_write(tmp / WEIGHTS, lambda f: save_file(state, f))
        write_json(tmp / INFO, info)
    return Path(out)


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise NetmendError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise NetmendError(f"{folder} is not a model folder (expected a folder with {WEIGHTS} and {INFO})")
    path = folder / INFO
    if not path.is_file():
        raise NetmendError(f"{folder} has no {INFO}")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NetmendError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or ("arch" not in info and "model_form" not in info):
        raise NetmendError(f"{path} does not describe a model (no 'arch' field)")
    return info


def build_model(info: dict[str, Any]) -> nn.Module:
    from .zoo.models import create_model

    args = dict(info.get("arch_args", {}))
    in_shape = args.pop("in_shape", None)
    num_classes = args.pop("num_classes", None)
    if in_shape is None or num_classes is None:
        raise NetmendError("model.json arch_args must give in_shape and num_classes")
    return create_model(info["arch"], in_shape, num_classes, **args)


def load_state(model: nn.Module, path: Path) -> nn.Module:
    if not path.is_file():
        raise NetmendError(f"weights file not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NetmendError(f"{path} is corrupt or not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise NetmendError(f"{path} does not match the architecture in model.json: {str(exc).splitlines()[0][:160]}") from None
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NetmendError(f"{path}: parameter {k} contains NaN or infinite values")
    return model


def load_model_folder(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, its model.json) from a model folder or a run folder."""
    folder = Path(folder)
    info = read_info(folder)
    if "model_form" in info:                      # a run folder of a user's own model (ONNX, .pt2, factory)
        from .formats.user_model import load_run_model

        model = load_run_model(folder, info)
        if info["model_form"] != "factory":
            info = {**info, "model_path": str((folder / info["model_file"]).resolve())}
        return model, info
    model = build_model(info)
    load_state(model, folder / WEIGHTS)
    return model.eval(), info


def load_any_model(path: str | os.PathLike, weights: str | None = None, own: bool = False) -> tuple[Any, dict[str, Any]]:
    """A model folder or run folder, a network file with a registered loader (.nnet, ACAS Xu .onnx), or — with
    `own` (the user gave --data) or for .pt2 / package.module:factory — the user's own model in its form."""
    from .formats.user_model import form_of, load_user_model
    from .registry import MODEL_FILES

    path = str(path)
    form = form_of(path)
    if form is not None and (own or form != "onnx" or weights is not None):
        return load_user_model(path, weights)
    if weights is not None:
        raise NetmendError("--weights applies to package.module:factory models")
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix not in MODEL_FILES:
            known = ", ".join(MODEL_FILES.names() + [".pt2"]) or "none"
            raise NetmendError(f"{p}: unknown model file type {suffix!r} (a model folder, package.module:factory, or "
                               f"one of: {known})")
        try:
            return MODEL_FILES.get(suffix)(p)
        except NetmendError as exc:            # not an ACAS Xu chain: any other ONNX classifier is the user's own
            if suffix == ".onnx" and ("unsupported ONNX op" in str(exc) or "single chain" in str(exc)
                                      or "must combine" in str(exc)):
                return load_user_model(path, None)
            raise
    if form is None and ":" in path and not p.exists():
        raise NetmendError(f"{path!r}: not a model folder, file or package.module:factory")
    return load_model_folder(p)
