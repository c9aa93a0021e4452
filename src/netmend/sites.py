"""Sites: what a localiser found — ranked layers, neurons or weights, each with a score — and the one rule that turns
them into the weight masks every masked repair tunes (`Sites.masks`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import NetmendError, require
from .hooks import capture, get_layer, input_block, reader_of

# What a neuron site on a weightless layer (flatten, pooling, activation: CARE's sites) passes through on its way to
# the weights that read it — those weights' input columns become the mask.
READ_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid,
                nn.MaxPool2d, nn.MaxPool1d, nn.AvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


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

    def masks(self, model: nn.Module, example: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{weight layer: 0/1 mask of its weight}, in site order; several sites on one layer add up (union).

        A weight site gives its mask; a neuron site the neuron's row (output unit / channel) or — on a weightless
        layer — the columns of the next weight layer that read it (`example`, one input, counts the layer's
        units); a plain layer site the whole weight."""
        masks: dict[str, torch.Tensor] = {}
        units = self._weightless_units(model, example)
        for s in self.sites:
            layer, index = s.layer, s.index
            w = getattr(get_layer(model, layer), "weight", None)
            if on_weightless_layer(model, s):
                require(0 <= index < units[layer], f"neuron {index} outside {layer}'s {units[layer]} units")
                layer, reader = reader_of(model, s.layer, READ_THROUGH)
                m = masks.setdefault(layer, torch.zeros_like(reader.weight, device="cpu"))
                m[input_block(reader, units[s.layer], index)] = 1
                continue
            if w is None:
                raise NetmendError(f"site layer {layer!r} has no weight to tune")
            m = masks.setdefault(layer, torch.zeros_like(w, device="cpu"))
            if s.kind == "weight" and s.mask is not None:
                require(tuple(s.mask.shape) == tuple(w.shape),
                        f"mask for {layer} has shape {tuple(s.mask.shape)}, weight {tuple(w.shape)}")
                m.copy_(torch.maximum(m, s.mask.to(m.dtype)))
            elif s.kind == "neuron" and index is not None:
                require(0 <= index < w.shape[0], f"neuron {index} outside {layer}'s {w.shape[0]} units")
                m[index] = 1
            else:
                m.fill_(1)
        return masks

    def _weightless_units(self, model: nn.Module, example: torch.Tensor | None) -> dict[str, int]:
        """Output units (dim 1) of every weightless layer holding a neuron site, from one forward pass."""
        names = sorted({s.layer for s in self.sites if on_weightless_layer(model, s)})
        if not names:
            return {}
        require(example is not None and len(example) > 0, f"an example input is needed to map neurons of "
                                                          f"{names[0]!r} to the weights that read them")
        p = next(model.parameters(), None)
        with torch.no_grad(), capture(model, names) as cap:
            model(example[:1].to(p.device if p is not None else "cpu"))
        return {n: int(cap.outputs[n].shape[1]) for n in names}

    def to_json(self) -> dict[str, Any]:
        return {"localiser": self.localiser, "seconds": self.seconds,
                "sites": [s.to_json() for s in self.sites], "details": _jsonable(self.details)}


def on_weightless_layer(model: nn.Module, site: Site) -> bool:
    """A neuron site on a layer without weights (CARE's flatten / activation units)."""
    return site.kind == "neuron" and site.index is not None and getattr(get_layer(model, site.layer), "weight", None) is None


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
