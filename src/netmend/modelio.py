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

from .edit import atomic_write, usual_permissions
from .errors import NetmendError, first_line
from .schema import check_parameter_count, validate_arch, validate_model_info

WEIGHTS, INFO = "model.safetensors", "model.json"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON (atomic). NaN / ±Infinity (not JSON) are written as null, each named in a top-level
    "notes" list (netmend.jsonsafe)."""
    from .jsonsafe import json_safe_with_notes

    obj = json_safe_with_notes(obj)

    def writer(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")

    atomic_write(path, writer)


# the hidden sibling a folder is built in is ".NAME.partial-PID-" + 8 random characters (PID: the building process, up
# to 7 digits); a run folder's model is built in a sibling of that sibling (write_run -> save_model_folder), so a new
# --out's name may grow by twice as much
_PARTIAL_EXTRA = len(".") + len(".partial-") + 8 + 8


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                  # exists, owned by someone else
        return True
    return True


def _sweep_partials(out: Path) -> None:
    """Remove the hidden siblings that runs killed outright (SIGKILL, power loss) left behind for this --out: their
    building process is gone. A sibling whose process still runs is another run in progress and is left alone."""
    prefix = f".{out.name}.partial-"
    try:
        siblings = [p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return
    for p in siblings:
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def check_fresh_out(out: str | os.PathLike) -> Path:
    """An --out folder must not exist yet or be empty: nothing of the user's is ever overwritten. It must also be
    creatable: under a folder (not a file), on a writable location, with names the file system takes — checked
    before any work is done."""
    out = Path(out)
    _check_creatable(out)
    if out.exists() and not out.is_dir():
        raise NetmendError(f"--out {out} exists and is not a folder")
    if any((out / name).exists() for name in (WEIGHTS, INFO, "model.onnx", "model.pt2")):
        raise NetmendError(f"--out {out} already holds a model; choose a new folder")
    if out.is_dir():
        first = next(iter(sorted(p.name for p in out.iterdir())), None)
        if first is not None:
            raise NetmendError(f"--out {out} already holds files ({first}); choose a new or empty folder")
    return out


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _check_creatable(out: Path) -> None:
    """--out can be made: its nearest existing ancestor is a writable folder and every name fits."""
    text = str(out)
    if not text.strip() or "\0" in text:
        raise NetmendError(f"--out {text!r} is not a usable folder name")
    absolute = Path(os.path.abspath(out))
    if len(os.fsencode(str(absolute))) >= 4096:
        raise NetmendError(f"--out is too long a path ({len(str(absolute))} characters)")
    missing: list[str] = []
    base = absolute
    while True:
        try:
            exists = base.exists() or base.is_symlink()
        except OSError:             # a name too long for the file system, a loop of links, ...
            exists = False
        if exists or base.parent == base:
            break
        missing.append(base.name)
        base = base.parent
    if base.exists() and not base.is_dir():
        raise NetmendError(f"--out {out}: {base} is a file, not a folder; choose a folder path")
    if base == absolute:           # --out itself exists (a folder: checked for emptiness by the caller)
        base = absolute.parent
    limit = _name_max(base)
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise NetmendError(f"--out {out}: the name {name[:40]}… is {len(os.fsencode(name))} bytes; this file "
                               f"system takes at most {limit}")
    extra = 2 * _PARTIAL_EXTRA if missing else _PARTIAL_EXTRA      # an existing (empty) folder: one sibling
    if len(os.fsencode(absolute.name)) + extra > limit:
        raise NetmendError(f"--out {out}: the folder name is {len(os.fsencode(absolute.name))} bytes; netmend "
                           f"builds it beside itself under a name {extra} bytes longer, and this file system "
                           f"takes at most {limit}: choose a name of at most {limit - extra}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise NetmendError(f"--out {out}: cannot create a folder in {base} (read-only or no permission)")
    try:                       # what access() cannot tell (a read-only or virtual file system, for root too)
        os.rmdir(tempfile.mkdtemp(dir=base, prefix=".netmend-probe-"))
    except OSError as exc:
        raise NetmendError(f"--out {out}: cannot create a folder in {base} ({exc.strerror or first_line(exc)})") from None


@contextmanager
def fresh_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Build a folder whole or not at all: files go into a hidden sibling, renamed into place at the end; on any
    error or interruption the sibling is removed and `out` is left as it was."""
    out = check_fresh_out(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_partials(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
        usual_permissions(tmp)
    except OSError as exc:
        raise NetmendError(f"cannot create {out}: {first_line(exc)}") from None
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise NetmendError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(info, dict) or ("arch" not in info and "model_form" not in info):
        raise NetmendError(f"{path} does not describe a model (no 'arch' field)")
    validate_model_info(info, str(path))
    return info


def build_model(info: dict[str, Any]) -> nn.Module:
    """The architecture model.json describes (validated first; its size counted on the meta device, which
    allocates nothing, before the real one is built)."""
    from .zoo.models import create_model

    validate_arch(info)
    args = {k: v for k, v in info.get("arch_args", {}).items() if v is not None}     # null: the default
    in_shape = args.pop("in_shape", None)
    num_classes = args.pop("num_classes", None)
    if in_shape is None or num_classes is None:
        raise NetmendError("model.json arch_args must give in_shape and num_classes")
    def about_model_json(exc: NetmendError) -> NetmendError:
        return NetmendError(exc if str(exc).startswith("model.json") else f"model.json: {exc}")

    try:
        with torch.device("meta"):
            probe = create_model(info["arch"], in_shape, num_classes, **args)
        counted = sum(t.numel() for t in list(probe.parameters()) + list(probe.buffers()))
    except NetmendError as exc:
        raise about_model_json(exc) from None
    except Exception:      # an architecture that cannot be built on the meta device: built for real below
        counted = 0
    check_parameter_count(counted)
    try:
        return create_model(info["arch"], in_shape, num_classes, **args)
    except NetmendError as exc:
        raise about_model_json(exc) from None
    except (ValueError, RuntimeError) as exc:
        raise NetmendError(f"model.json: cannot build {info['arch']!r} from its arch_args: {first_line(exc)}") from None


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


def check_finite(model: nn.Module, where: str) -> nn.Module:
    """Refuse a network whose weights hold NaN or ±Inf (a buffer may hold ±Inf, e.g. an attention mask, not NaN)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p.detach()).all():
            raise NetmendError(f"{where}: weight {name} contains NaN or infinite values; netmend refuses such a network")
    for name, b in model.named_buffers():
        if b.is_floating_point() and torch.isnan(b).any():
            raise NetmendError(f"{where}: buffer {name} contains NaN values; netmend refuses such a network")
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
    `own` (the user gave --data) or for .pt2 / package.module:factory — the user's own model in its form. A
    network with NaN or infinite weights is refused."""
    model, info = _load_any(path, weights, own)
    return check_finite(model, str(path)), info


def _load_any(path: str | os.PathLike, weights: str | None, own: bool) -> tuple[Any, dict[str, Any]]:
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
