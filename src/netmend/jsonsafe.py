"""JSON a user reads is strict JSON: NaN and ±Infinity (which Python's json writes bare, and most JSON readers
refuse) become null, and each one is named in a note — `json_safe(obj) -> (obj, notes)`.

Every json.dump of user-visible output (metrics.json, config.json, sites.json, model.json, `--json` lines)
goes through here; `dumps` is the one-call form.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable


def plain(o: Any) -> Any:
    """Tensors, numpy values and paths as plain JSON values (the default every writer shares)."""
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):                 # torch.Tensor, numpy arrays and numpy scalars
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "__float__"):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def json_safe(obj: Any, default: Callable[[Any], Any] | None = plain, _path: str = "") -> tuple[Any, list[str]]:
    """(a copy of obj with every NaN / ±Inf float replaced by None, notes naming each replaced value)."""
    notes: list[str] = []

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, bool) or o is None or isinstance(o, (str, int)):
            return o
        if isinstance(o, float):
            if math.isfinite(o):
                return o
            word = "NaN" if o != o else ("Infinity" if o > 0 else "-Infinity")
            notes.append(f"{path or 'value'}: {word} written as null")
            return None
        if isinstance(o, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(o)]
        if default is None:
            raise TypeError(f"not JSON serialisable: {type(o).__name__}")
        return walk(default(o), path)

    return walk(obj, _path), notes


def json_safe_with_notes(obj: Any, default: Callable[[Any], Any] | None = plain) -> Any:
    """json_safe, with the notes added to a top-level object's "notes" list (after any notes it has)."""
    safe, notes = json_safe(obj, default)
    if notes and isinstance(safe, dict):
        earlier = safe.get("notes")
        safe["notes"] = (earlier if isinstance(earlier, list) else ([earlier] if earlier is not None else [])) + notes
    return safe


def dumps(obj: Any, default: Callable[[Any], Any] | None = plain, **kwargs: Any) -> str:
    """json.dumps of json_safe_with_notes(obj): never a bare NaN or Infinity."""
    return json.dumps(json_safe_with_notes(obj, default), allow_nan=False, **kwargs)
