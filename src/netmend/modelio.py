"""Model folders: `model.safetensors` + `model.json` (architecture, data, defect, training, metrics).

Loading never unpickles (safetensors only); saving is atomic and never overwrites a model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    """An --out folder must not already hold a model (nothing is ever overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NetmendError(f"--out {out} exists and is not a folder")
    if (out / WEIGHTS).exists() or (out / INFO).exists():
        raise NetmendError(f"--out {out} already holds a model; choose a new folder")
    return out


def save_model_folder(out: str | os.PathLike, model: nn.Module, info: dict[str, Any]) -> Path:
    out = check_fresh_out(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(out / INFO, info)
    return out


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
    if not isinstance(info, dict) or "arch" not in info:
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
    model = build_model(info)
    load_state(model, folder / WEIGHTS)
    return model.eval(), info
