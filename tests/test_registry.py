"""Typed configs from user options: `make_config` reads `-L/-R key=value` values against the fields' types."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from netmend.errors import NetmendError
from netmend.registry import make_config


@dataclass
class Cfg:
    outputs: list[int] | None = None
    layer: str | None = None
    keep: int = 3
    alpha: float = 0.5
    loop: bool = False


def test_values_are_read_against_the_field_types():
    c = make_config(Cfg, {"outputs": 0, "layer": 0, "alpha": 1, "keep": 5, "loop": True})
    assert c.outputs == [0]            # one value where a list is expected
    assert c.layer == "0"              # a Sequential child's name, read as a JSON number
    assert c.alpha == 1 and c.keep == 5 and c.loop is True
    assert make_config(Cfg, {"outputs": [0, 1], "layer": None}).outputs == [0, 1]


@pytest.mark.parametrize("key,value", [("keep", "many"), ("keep", 2.5), ("alpha", "high"), ("loop", 1), ("alpha", True)])
def test_a_value_of_the_wrong_type_is_a_one_line_error(key, value):
    with pytest.raises(NetmendError, match=key):
        make_config(Cfg, {key: value})


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(NetmendError, match="valid"):
        make_config(Cfg, {"kep": 3})
