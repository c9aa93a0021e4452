"""The grid writer's TOML values read back as the same Python values; a null is a one-line error."""
from __future__ import annotations

import tomllib

import pytest

from netmend.bench.toml_text import toml_value
from netmend.errors import NetmendError


def test_values_read_back_the_same():
    value = {"locate": {"keep": 13, "inputs": True, "score": "drop"}, "alpha": 0.9, "seeds": [0, 1, 2],
             "folder": '/data/a "quoted" path\\x', "odd key.with dots": {"nested": [1.5, "two"]}, "empty": {}}
    text = "\n".join(f"{toml_value(k) if not k.isidentifier() else k} = {toml_value(v)}" for k, v in value.items())
    assert tomllib.loads(text) == value


def test_null_is_refused_in_one_line():
    with pytest.raises(NetmendError, match="TOML has no null"):
        toml_value({"asr_threshold": None})
