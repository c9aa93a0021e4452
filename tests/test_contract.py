"""The method ↔ defect contract: capabilities declared at registration and checked once by api.repair; per-defect
defaults resolved before the run, so the config records the values used; components found without a list."""
from __future__ import annotations

import pkgutil

import pytest
import torch
from torch import nn

import netmend
from netmend.defects.base import Defect, RepairData
from netmend.defects.capabilities import (CAPABILITIES, EvidenceRounds, PropertyRegion, Stamped, Targeted,
                                          has_objective)
from netmend.errors import NetmendError
from netmend.registry import LOCALISERS, METHODS, REPAIRERS


class Bare(Defect):
    """A defect with nothing but the core: repair data, a violation and metrics."""

    kind = "bare"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
        self.repair = RepairData(x[:30], y[:30], x[30:], y[30:])
        self.num_classes, self.in_shape = 3, [4]

    def violation(self, model, x, y):
        return torch.zeros(len(x))

    def metrics(self, model):
        return {"clean_accuracy": self.validation_score(model)}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_every_declared_need_is_a_known_capability():
    for registry in (LOCALISERS, REPAIRERS):
        for entry in registry.entries():
            assert set(entry.extra.get("needs", ())) <= set(CAPABILITIES), entry.name
    assert REPAIRERS.entry("rectify").extra["needs"] == ("pairs",)
    assert REPAIRERS.entry("property_tune").extra["needs"] == ("property-region",)
    assert LOCALISERS.entry("probe").extra["needs"] == ("argmax",)


@pytest.mark.parametrize("method,says", [("rectify", "rectify needs evidence pairs x̃ → x; a bare defect has none"),
                                         ("rectify-static", "rectify-static needs evidence pairs"),
                                         ("care", "care needs a search objective; a bare defect defines none"),
                                         ("property-tune", "property-tune needs a property's input region"),
                                         ("property-patch", "property-patch needs a property's input region")])
def test_a_missing_capability_is_one_line_before_anything_runs(method, says):
    d = Bare()
    with pytest.raises(NetmendError, match=says.replace("(", r"\(")) as exc:
        netmend.api.repair(_net(), d, method=method)
    assert "\n" not in str(exc.value)


def test_methods_without_needs_run_on_the_core_contract():
    r = netmend.api.repair(_net(), Bare(), method="finetune", repair_options={"epochs": 1}, gate=False)
    assert r.edit.deltas and not has_objective(Bare())


def test_protocols_match_the_defects_that_have_them(defect):
    assert isinstance(defect, Stamped) and isinstance(defect, Targeted) and defect.variant == "badnets"
    assert not isinstance(defect, PropertyRegion) and not isinstance(defect, EvidenceRounds)
    assert not isinstance(Bare(), Stamped) and Bare().variant == "bare"


def test_per_defect_defaults_are_resolved_before_the_run_and_recorded(backdoored, defect):
    """CARE's α and mode for a backdoor, and the causal output's settings, are in config.json — not null."""
    model, _ = backdoored
    r = netmend.api.repair(model, defect, method="care", repair_options={"iterations": 2, "particles": 4},
                           locate_options={"samples": 50}, gate=False)
    rep, loc = r.config["repair_options"], r.config["locate_options"]
    assert (rep["mode"], rep["alpha"], rep["rounds"], rep["budget"]) == ("scale", 0.5, 0, None)
    assert (loc["output"], loc["steps"], loc["keep"], loc["score"], loc["cnn_layer"]) == ("backdoor", 4, 30, "range",
                                                                                           "features")
    r2 = netmend.api.repair(model, defect, method="care", repair_options={"iterations": 2, "particles": 4, "alpha": 0.9},
                            locate_options={"samples": 50, "keep": 3}, gate=False)
    assert r2.config["repair_options"]["alpha"] == 0.9 and r2.config["locate_options"]["keep"] == 3   # the user's


def test_a_registered_component_resolves_its_defaults_however_it_is_called():
    """`defaults=` is applied by the registry: a direct call of the registered function fills the same values."""
    from dataclasses import dataclass

    from netmend.registry import Registry

    @dataclass
    class Cfg:
        alpha: float | None = None
        keep: int = 3

    reg: Registry = Registry("test component")
    seen = []

    @reg.register("probe-defaults", config=Cfg, defaults=lambda defect, cfg: {"alpha": 0.5 if defect.kind == "a" else 0.1})
    def component(model, defect, sites, cfg):
        seen.append(cfg.alpha)

    d = Bare()
    component(None, d, None, Cfg())                  # positional, as api.repair calls it
    component(None, d, None, cfg=Cfg(alpha=0.9))     # by keyword; the user's value wins
    assert seen == [0.1, 0.9] and reg.get("probe-defaults") is component


def test_a_new_component_needs_no_list_to_be_found():
    """Every module of the component packages is imported on first use: a new repairer is one new file."""
    import importlib
    import sys

    pkg = importlib.import_module("netmend.repair")      # `netmend.repair` the attribute is the repair function
    names = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    assert {"rectify", "pso", "finetune"} <= names
    assert all(f"netmend.repair.{n}" in sys.modules for n in names)
    assert {"rectify", "care", "inner", "finetune", "fine-pruning"} <= set(METHODS.names())
