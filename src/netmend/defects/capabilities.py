"""What a defect can do beyond the core contract of `Defect` (defects/base.py), as small checkable protocols.

Every defect has repair data, `violation`, `metrics` and `gate_check`. Some also have evidence pairs, a search
objective, a stamp that carries the corruption to any input, evidence made afresh against a model, or a property
region to sample. A localiser or repairer names at registration what it needs:

    @REPAIRERS.register("rank-one", "...", config=RankOneConfig, needs=("pairs",))

and `api.repair` checks every need once, before anything runs, failing with one line that names the method, the
need and the defect ("rectify needs evidence pairs x̃ → x; a fairness defect has none: use care or finetune").
Code that uses a capability only when it is there tests `isinstance(defect, Stamped)` (the protocols below),
not attribute names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import NetmendError

if TYPE_CHECKING:
    from .base import Defect, Objective


@runtime_checkable
class Stamped(Protocol):
    """The corruption can be put on any input (a backdoor's trigger, a spurious cue)."""

    def stamp(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Targeted(Protocol):
    """The misbehaviour pulls inputs to one class, `target` (backdoors, targeted attacks)."""

    target: int | None


@runtime_checkable
class Regenerating(Protocol):
    """The evidence can be made afresh against the model under repair (adversarial examples)."""

    def regenerate(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PropertyRegion(Protocol):
    """A property whose input region can be sampled afresh, with the counterexamples found so far (safety)."""

    prop: object

    def sample_fresh(self, n_box: int, n_keep: int, g: torch.Generator) -> tuple[torch.Tensor, ...]: ...

    def fit_counterexamples(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class EvidenceRounds(Protocol):
    """Evidence found by a search that can run again against a candidate repair: falsify → repair rounds."""

    def more_evidence(self, model: nn.Module, round: int) -> int: ...

    def clear_rounds(self) -> None: ...

    def add_counterexamples(self, x: torch.Tensor) -> int: ...


@runtime_checkable
class ValidationObjective(Protocol):
    """A search objective on the validation split, apart from the one a search fits on."""

    def validation_objective(self, model: nn.Module) -> "Objective": ...


@runtime_checkable
class Counterfactual(Protocol):
    """Inputs can be copied with their protected attribute(s) set to every other value (fairness)."""

    def flip(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class RatioEstimate(Protocol):
    """The repair-data estimate (`Defect.repair_estimate`) is a ratio of per-sample sums, Σ num / Σ den, over a
    fixed set of repair samples in a seeded random order: part of the set estimates it, so rectification can race
    its candidate edits on growing prefixes and measure the full set only for those still in the running."""

    def estimate_size(self) -> int: ...

    def estimate_terms(self, model: nn.Module, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def has_objective(defect: "Defect") -> bool:
    """The defect defines a search objective (its class overrides `Defect.objective`)."""
    from .base import Defect

    return type(defect).objective is not Defect.objective


@dataclass(frozen=True)
class Capability:
    """A need a method can declare: `has(defect)`, and `why(defect)` the rest of the one-line error when not."""

    what: str
    has: Callable[["Defect"], bool]
    why: Callable[["Defect"], str]


def _pairs_missing(d: "Defect") -> str:
    if hasattr(d, "options") and hasattr(d.options, "pairs"):
        return "none were asked for (use --pairs N with N ≥ 1)"
    return f"a {d.kind} defect has none (an input and its cleansed twin): use care or finetune"


CAPABILITIES: dict[str, Capability] = {
    "pairs": Capability("evidence pairs x̃ → x", lambda d: d.pairs is not None and len(d.pairs) > 0, _pairs_missing),
    "argmax": Capability("decisions read as the largest output", lambda d: d.decision == "argmax",
                         lambda d: f"the {d.kind} defect decides by {d.decision}: use care or finetune"),
    "objective": Capability("a search objective", has_objective,
                            lambda d: f"a {d.kind} defect defines none: use rectify or finetune"),
    "property-region": Capability("a property's input region to sample", lambda d: isinstance(d, PropertyRegion),
                                  lambda d: f"a {d.kind} defect has none: use finetune"),
    "regenerate": Capability("evidence it can regenerate against the model", lambda d: isinstance(d, Regenerating),
                             lambda d: f"a {d.kind} defect cannot regenerate its evidence (adversarial defects can)"),
}


def require_capability(defect: "Defect", need: str, method: str) -> None:
    """One line when `defect` lacks `need` (a key of CAPABILITIES)."""
    cap = CAPABILITIES[need]
    if not cap.has(defect):
        raise NetmendError(f"{method} needs {cap.what}; {cap.why(defect)}")


def check_needs(defect: "Defect", needs: tuple[str, ...] | list[str], method: str) -> None:
    """Every declared need of a method against the defect, in the order declared."""
    unknown = [n for n in needs if n not in CAPABILITIES]
    if unknown:
        raise ValueError(f"{method} declares unknown needs {unknown}; known: {sorted(CAPABILITIES)}")
    for need in needs:
        require_capability(defect, need, method)
