"""Named registries with typed configs: methods, defects, architectures, datasets, triggers.

One factory per kind, no if/elif chains: `ARCHITECTURES.create("small-cnn", **kwargs)`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from .errors import NetmendError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    description: str = ""
    config: type | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A mapping name -> entry with a decorator for registration and a clear error for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "", config: type | None = None, **extra: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj, description, config, **extra)

        return deco

    def add(self, name: str, obj: T, description: str = "", config: type | None = None, **extra: Any) -> T:
        """Register `obj`; a component with per-defect `defaults` is registered (and returned) resolving them."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if extra.get("defaults") is not None:
            obj = with_defaults(obj, extra["defaults"])
        self._entries[name] = Entry(name, obj, description, config, dict(extra))
        return obj

    def entry(self, name: str) -> Entry[T]:
        _load_builtins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NetmendError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        _load_builtins()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._entries


def make_config(config_cls: type | None, overrides: dict[str, Any] | None):
    """Build a dataclass config from overrides, rejecting unknown fields with a clear message."""
    overrides = dict(overrides or {})
    if config_cls is None:
        if overrides:
            raise NetmendError(f"this component takes no options, got {sorted(overrides)}")
        return None
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise NetmendError(f"unknown option(s) {unknown} for {config_cls.__name__}; valid: {sorted(names)}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: _checked(config_cls.__name__, k, str(fields[k].type), v) for k, v in overrides.items()})


def fill_defaults(cfg: Any, defaults: Callable[[Any, Any], dict[str, Any]] | None, defect: Any) -> Any:
    """`cfg` with its None fields set from `defaults(defect, cfg)`: the values a component takes for this defect
    (CARE's α per defect kind, INNER's τ per attack, ...). A component registers that function (`defaults=`), and
    api.repair resolves it before the run, so config.json records the values used, not None."""
    if cfg is None or defaults is None or defect is None:
        return cfg
    values = defaults(defect, cfg)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise ValueError(f"{type(cfg).__name__}: per-defect defaults name unknown fields {unknown}")
    fill = {k: v for k, v in values.items() if getattr(cfg, k) is None and v is not None}
    return check_config(dataclasses.replace(cfg, **fill)) if fill else cfg


def with_defaults(fn: Callable, defaults: Callable[[Any, Any], dict[str, Any]]) -> Callable:
    """A localiser / repairer `fn(model, defect, [sites,] cfg)` that fills its config's per-defect defaults first,
    however it is called (api.repair resolves them earlier, for config.json; then this is a no-op)."""
    import functools

    @functools.wraps(fn)
    def run(model: Any, defect: Any, *rest: Any, **kw: Any) -> Any:
        if "cfg" in kw:
            kw["cfg"] = fill_defaults(kw["cfg"], defaults, defect)
        elif rest:
            rest = (*rest[:-1], fill_defaults(rest[-1], defaults, defect))
        return fn(model, defect, *rest, **kw)

    return run


_SCALARS = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,)}

# One rule for every numeric option of every config (methods, defects, training), by the option's name: a
# learning rate, batch size, epoch / step / iteration count or swarm size must be > 0; any other count (rounds,
# samples, pairs, steps of a sub-step, ...) must be ≥ 0; and no number may be NaN or infinite.
_POSITIVE = re.compile(r"^(epochs|steps|n_steps|max_steps|iterations|particles|batch_size|lr)$|_(lr|batch|batch_size)$")
_NON_NEGATIVE = re.compile(r"(epochs|steps|rounds|samples|iter|pairs|batch|num|starts|elems|counterexamples)$")


def check_number(name: str, value: Any, owner: str) -> None:
    """The shared rule for a numeric option `name` (see _POSITIVE / _NON_NEGATIVE), for a number or each number of
    a list; a one-line error if broken."""
    if isinstance(value, (list, tuple)):
        for v in value:
            check_number(name, v, owner)
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    if not math.isfinite(float(value)):
        raise NetmendError(f"option {name}={value!r} for {owner}: must be a finite number")
    if _POSITIVE.search(name) and value <= 0:
        raise NetmendError(f"option {name}={value!r} for {owner}: must be > 0")
    if _NON_NEGATIVE.search(name) and value < 0:
        raise NetmendError(f"option {name}={value!r} for {owner}: must be ≥ 0")


def check_config(cfg: Any, owner: str | None = None) -> Any:
    """Every numeric field of a dataclass config (and every number in a list field) against check_number."""
    owner = owner or type(cfg).__name__
    for f in dataclasses.fields(cfg):
        check_number(f.name, getattr(cfg, f.name), owner)
    return cfg


def _checked(owner: str, name: str, annotation: str, value: Any) -> Any:
    """A user's option value against the field's annotation: a single value where a list is expected becomes a
    one-element list (`-L outputs=0`); a number for a text field becomes text; a value that is not of a number /
    flag field's type is a one-line error, not a traceback later (text fields take anything, e.g. a torch.device)."""
    kinds = [t.strip() for t in annotation.split("|")]
    if value is None and "None" in kinds:
        return value
    check_number(name, value, owner)
    if any(t.startswith(("list", "tuple", "Sequence")) for t in kinds):
        return value if isinstance(value, (list, tuple)) else [value]
    if "str" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)                  # `-L layer=0` (a Sequential's child) was read as JSON
    plain = [_SCALARS[t] for t in kinds if t in _SCALARS]
    if plain and len(plain) == len([t for t in kinds if t != "None"]):
        ok = any(isinstance(value, tp) and not (isinstance(value, bool) and bool not in tp) for tp in plain)
        if not ok:
            raise NetmendError(f"option {name}={value!r} for {owner}: expected {annotation}")
    return value


ARCHITECTURES: Registry[Callable] = Registry("architecture")
DATASETS: Registry[Callable] = Registry("dataset")
TRIGGERS: Registry[Callable] = Registry("trigger")
DEFECTS: Registry[Callable] = Registry("defect")
LOCALISERS: Registry[Callable] = Registry("localiser")
REPAIRERS: Registry[Callable] = Registry("repairer")
METHODS: Registry[Any] = Registry("method")
MODEL_FILES: Registry[Callable] = Registry("model file type")   # suffix (".nnet") -> fn(path) -> (model, info)

_LOADED = False


def _load_builtins() -> None:
    """Import the modules that register netmend's own components (once, lazily)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import _builtin  # noqa: F401


def load_plugins() -> None:
    """Modules named in NETMEND_PLUGINS (comma-separated, importable from the current folder) register the user's
    own methods, localisers, repairers or defects, so the CLI can run them like netmend's own (API users simply
    import their module)."""
    import importlib
    import os
    import sys

    names = [n.strip() for n in os.environ.get("NETMEND_PLUGINS", "").split(",") if n.strip()]
    if not names:
        return
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # the user's module: any error becomes one line
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                raise NetmendError(f"NETMEND_PLUGINS: importing {name} failed: {type(exc).__name__}: {first}") from None
    finally:
        if added:
            sys.path.remove(cwd)


@dataclass(frozen=True)
class OptionDoc:
    name: str
    type: str
    default: Any
    help: str


def config_options(config_cls: type | None) -> list[OptionDoc]:
    """Every field of a typed config with its type, default and help — the comment written beside the field in
    the source (the same text a reader of the code sees), first sentence only."""
    if config_cls is None:
        return []
    comments = _field_comments(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append(OptionDoc(f.name, str(f.type), default, comments.get(f.name, "")))
    return out


def _field_comments(config_cls: type) -> dict[str, str]:
    import inspect
    import io
    import re
    import tokenize

    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    found: dict[str, list[str]] = {}
    current = None
    field_line = re.compile(r"^\s+(\w+)\s*:")
    lines = source.splitlines()
    comment_at: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comment_at[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    for i, line in enumerate(lines, start=1):
        m = field_line.match(line)
        if m and m.group(1) in names:
            current = m.group(1)
            found[current] = [comment_at[i]] if i in comment_at else []
        elif current and line.strip().startswith("#") and i in comment_at and found[current]:
            found[current].append(comment_at[i])         # a comment continued on the next lines
        elif line.strip():
            current = None
    out = {}
    for name, parts in found.items():
        text = " ".join(parts)
        cut = re.search(r"(?<=[.;])\s", text)
        out[name] = (text[: cut.start()] if cut else text).rstrip(" ;")
    return out
