"""Sites: what a localiser found — ranked layers, neurons or weights, each with a score."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Site:
    """One place to repair. `layer` is a dotted module name; `kind` is layer | neuron | weight.

    neuron: `index` is the unit (Linear output or conv channel) of `layer`'s output.
    weight: `mask` (same shape as `layer`'s weight) marks the weights to change.
    """

    layer: str
    kind: str = "layer"
    score: float = 0.0
    index: int | None = None
    mask: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mask")
        if self.mask is not None:
            d["mask_count"] = int(self.mask.sum())
            d["mask_shape"] = list(self.mask.shape)
        return d


@dataclass
class Sites:
    """Ranked sites (best first) plus everything the localiser measured on the way (all scores)."""

    sites: list[Site] = field(default_factory=list)
    localiser: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i):
        return self.sites[i]

    def layers(self) -> list[str]:
        seen: list[str] = []
        for s in self.sites:
            if s.layer not in seen:
                seen.append(s.layer)
        return seen

    def neurons(self, layer: str | None = None) -> list[Site]:
        return [s for s in self.sites if s.kind == "neuron" and (layer is None or s.layer == layer)]

    def to_json(self) -> dict[str, Any]:
        return {"localiser": self.localiser, "seconds": self.seconds,
                "sites": [s.to_json() for s in self.sites], "details": _jsonable(self.details)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return obj
