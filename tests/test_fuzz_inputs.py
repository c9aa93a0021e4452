"""Property-based tests of the two parsers a user's file reaches first: the VNN-LIB reader and model.json.

Whatever the text or the JSON, the answer is a parsed value or a one-line NetmendError — never another
exception (a traceback), never a multi-line message. Hypothesis draws the inputs; a fixed seed and a small
example budget keep the suite fast and repeatable.
"""
from __future__ import annotations

import copy
import json

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from netmend.data.vnnlib import parse_vnnlib  # noqa: E402
from netmend.errors import NetmendError  # noqa: E402
from netmend.modelio import build_model  # noqa: E402
from netmend.schema import validate_model_info  # noqa: E402

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

GOOD_VNNLIB = """(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (<= X_0 1.0))
(assert (>= X_0 -1.0))
(assert (and (<= X_1 1) (>= X_1 -1)))
(assert (or (and (<= Y_0 Y_1)) (and (>= Y_0 (+ Y_1 2.5)))))
"""

TOKENS = ["(", ")", "(", ")", " ", "\n", "declare-const", "assert", "Real", "and", "or", "<=", ">=", "+", "-", "*",
          "X_0", "X_1", "X_7", "Y_0", "Y_1", "Y_9", "0", "1.5", "-2", "1e400", "nan", "inf", ";", "X_", "Y_-1", "foo"]


def _one_line_or_parsed(text: str) -> None:
    try:
        p = parse_vnnlib(text, "fuzz")
    except NetmendError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return
    assert p.n_inputs >= 1 and p.n_outputs >= 1
    for lo, hi in p.boxes:                      # what parses is usable: finite, ordered bounds
        assert bool((lo <= hi).all())


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=80))
def test_vnnlib_token_soup_parses_or_gives_one_line(tokens):
    _one_line_or_parsed(" ".join(tokens))


@FAST
@given(st.integers(0, len(GOOD_VNNLIB) - 1), st.integers(0, 40), st.text(max_size=12))
def test_vnnlib_edits_of_a_good_file_parse_or_give_one_line(at, cut, insert):
    """Deletions and insertions anywhere in a valid property: truncated, unbalanced, odd characters."""
    _one_line_or_parsed(GOOD_VNNLIB[:at] + insert + GOOD_VNNLIB[at + cut:])


def test_vnnlib_good_file_parses():
    p = parse_vnnlib(GOOD_VNNLIB, "good")
    assert (p.n_inputs, p.n_outputs) == (2, 2)


GOOD_INFO = {"arch": "mlp", "dataset": "census", "split_seed": 0,
             "arch_args": {"in_shape": [13], "num_classes": 2, "hidden": [16, 8], "mean": [0.0] * 13,
                           "std": [1.0] * 13},
             "defect": {"kind": "fairness", "protected": "sex"}}

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
FIELDS = [("arch",), ("dataset",), ("arch_args",), ("arch_args", "in_shape"), ("arch_args", "num_classes"),
          ("arch_args", "hidden"), ("arch_args", "mean"), ("arch_args", "std"), ("defect",), ("defect", "kind"),
          ("defect", "protected"), ("defect", "target"), ("defect", "trigger")]


@FAST
@given(st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES), min_size=1, max_size=3))
def test_model_json_with_any_field_values_validates_or_gives_one_line(changes):
    """Each drawn change puts an arbitrary JSON value in one field of a valid model.json; validation and the
    build either succeed (a model of sane size) or stop with one line naming model.json."""
    info = copy.deepcopy(GOOD_INFO)
    for path, value in changes:
        node = info
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    info = json.loads(json.dumps(info))          # what a file could hold (NaN / Infinity included, as Python writes)
    try:
        validate_model_info(info)
        net = build_model(info)
    except NetmendError as exc:
        assert "\n" not in str(exc).strip() and "model.json" in str(exc), str(exc)
        return
    assert sum(p.numel() for p in net.parameters()) > 0


def test_model_json_good_info_builds():
    validate_model_info(GOOD_INFO)
    assert build_model(copy.deepcopy(GOOD_INFO)) is not None
