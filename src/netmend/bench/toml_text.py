"""Writing grid files from Python: a value as TOML text.

Benchmark scripts that wrap `netmend bench` write their grid from their own options (benchmarks/care.py, inner.py).
The standard library reads TOML (tomllib) but does not write it, and a grid needs only scalars, lists and inline
tables, so this is the whole writer.
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import NetmendError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(v: Any) -> str:
    """`v` as a TOML value: booleans, numbers, strings, lists and inline tables (TOML has no null: refused)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)                     # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        key = lambda k: k if _BARE_KEY.fullmatch(k) else json.dumps(k)     # noqa: E731
        return "{ " + ", ".join(f"{key(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise NetmendError(f"cannot write {v!r} into a grid file (TOML has no null)")
