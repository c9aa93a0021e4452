"""Backdoor triggers stamped in pixel space, each a seeded, serialisable spec.

x̃ = (1 − m) ⊙ x + m ⊙ p for a patch (BadNets) and x̃ = (1 − α m) ⊙ x + α m ⊙ t for a blend.
Every trigger exposes `apply(x)` and `mask` so a triggered sample keeps its cleansed twin x and
the place where the two differ.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import NetmendError
from ..registry import TRIGGERS

POSITIONS = ("br", "bl", "tr", "tl", "center")


@dataclass
class TriggerSpec:
    """What a trigger is; saved in model.json so a model's defect can be rebuilt exactly."""

    kind: str = "badnets"
    size: int = 3
    position: str = "br"
    margin: int = 0
    pattern: str = "white"          # badnets: white | checker | random
    alpha: float = 0.2              # blended: visibility
    seed: int = 0                   # random patterns, blend images, warping grids
    params: dict[str, Any] = field(default_factory=dict)   # extra, trigger-specific

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "TriggerSpec":
        return TriggerSpec(**d)


class Trigger:
    """A trigger for images of shape (C, H, W): `apply` stamps, `mask` (H×W in [0, 1]) says where."""

    def __init__(self, spec: TriggerSpec, image_shape: tuple[int, int, int]):
        self.spec = spec
        self.image_shape = tuple(int(s) for s in image_shape)

    mask: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-3:]) != self.image_shape:
            raise NetmendError(f"trigger built for images {self.image_shape}, got {tuple(x.shape[-3:])}")


def trigger_box(spec: TriggerSpec, h: int, w: int) -> tuple[int, int]:
    s, m = spec.size, spec.margin
    if s < 1 or s + m > min(h, w):
        raise NetmendError(f"trigger size {s} (margin {m}) does not fit a {h}×{w} image")
    if spec.position not in POSITIONS:
        raise NetmendError(f"unknown trigger position {spec.position!r}; use one of {', '.join(POSITIONS)}")
    top = {"t": m, "b": h - m - s, "c": (h - s) // 2}[spec.position[0]]
    left = {"l": m, "r": w - m - s, "c": (w - s) // 2}[spec.position[-1] if spec.position != "center" else "c"]
    return top, left


PATCH_PARAMS = ("visibility", "train_positions", "train_visibilities")


class PatchTrigger(Trigger):
    """BadNets: replace an s×s patch at a corner (or the centre) with a fixed pattern.

    params: `visibility` v in (0, 1] stamps (1 − v·m) ⊙ x + v·m ⊙ p (1: the patch replaces the pixels).
    `train_positions` / `train_visibilities`: poison training with the patch at each of these positions / at each
    of these visibilities in turn (the generalisation experiment: a backdoor that fires wherever and however
    faintly the patch appears); `apply` stamps at the spec's own position and visibility."""

    def __init__(self, spec: TriggerSpec, image_shape):
        super().__init__(spec, image_shape)
        unknown = sorted(set(spec.params) - set(PATCH_PARAMS))
        if unknown:
            raise NetmendError(f"unknown BadNets parameter(s) {unknown}; valid: {list(PATCH_PARAMS)}")
        self.visibility = float(spec.params.get("visibility", 1.0))
        if not 0 < self.visibility <= 1:
            raise NetmendError(f"BadNets visibility must be in (0, 1], got {self.visibility}")
        c, h, w = self.image_shape
        top, left = trigger_box(spec, h, w)
        s = spec.size
        if spec.pattern == "white":
            patch = torch.ones(c, s, s)
        elif spec.pattern == "checker":
            ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            patch = ((ii + jj) % 2 == 0).float().expand(c, s, s).clone()
        elif spec.pattern == "random":
            patch = torch.rand(c, s, s, generator=torch.Generator().manual_seed(spec.seed))
        else:
            raise NetmendError(f"unknown patch pattern {spec.pattern!r}; use white, checker or random")
        self.mask = torch.zeros(h, w)
        self.mask[top: top + s, left: left + s] = 1.0
        self.pattern = torch.zeros(c, h, w)
        self.pattern[:, top: top + s, left: left + s] = patch
        self.variants = [self.at(pos, vis) for pos in spec.params.get("train_positions", [spec.position])
                         for vis in spec.params.get("train_visibilities", [self.visibility])]

    def at(self, position: str | None = None, visibility: float | None = None) -> "PatchTrigger":
        """The same patch at another position and/or visibility (this trigger when neither changes)."""
        params = {k: v for k, v in self.spec.params.items() if k == "visibility"}
        if visibility is not None:
            params["visibility"] = float(visibility)
        spec = TriggerSpec(**{**self.spec.to_json(), "position": position or self.spec.position, "params": params})
        if spec.position == self.spec.position and params.get("visibility", 1.0) == self.visibility \
                and not ({"train_positions", "train_visibilities"} & set(self.spec.params)):
            return self
        return PatchTrigger(spec, self.image_shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        m = self.visibility * self.mask.to(x.device, x.dtype)
        return (1 - m) * x + m * self.pattern.to(x.device, x.dtype)

    def poison_training(self, x: torch.Tensor, y: torch.Tensor, pidx: torch.Tensor, target: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Stamp and relabel x[pidx]; with training variants, the i-th poisoned sample (in a seeded order) gets
        variant i mod V."""
        x, y = x.clone(), y.clone()
        if not len(pidx):
            return x, y, {}
        if len(self.variants) == 1:
            x[pidx] = stamp_batched(self.variants[0], x[pidx])
        else:
            order = pidx[torch.randperm(len(pidx), generator=torch.Generator().manual_seed(int(seed) + 613))]
            for v, trig in enumerate(self.variants):
                part = order[v:: len(self.variants)]
                x[part] = stamp_batched(trig, x[part])
        y[pidx] = int(target)
        return x, y, ({"variants": len(self.variants)} if len(self.variants) > 1 else {})


class BlendTrigger(Trigger):
    """Blended: x̃ = (1 − α)·x + α·t over the whole image (or α·m for a localised blend)."""

    def __init__(self, spec: TriggerSpec, image_shape, image: torch.Tensor | None = None):
        super().__init__(spec, image_shape)
        c, h, w = self.image_shape
        if not 0 < spec.alpha <= 1:
            raise NetmendError(f"blend alpha must be in (0, 1], got {spec.alpha}")
        if image is None:
            image = torch.rand(c, h, w, generator=torch.Generator().manual_seed(spec.seed))
        self.pattern = image
        self.mask = torch.ones(h, w)
        if spec.params.get("local"):
            top, left = trigger_box(spec, h, w)
            self.mask = torch.zeros(h, w)
            self.mask[top: top + spec.size, left: left + spec.size] = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a = self.spec.alpha * self.mask.to(x.device, x.dtype)
        return (1 - a) * x + a * self.pattern.to(x.device, x.dtype)


TRIGGERS.add("badnets", PatchTrigger, "BadNets patch (size, position, white|checker|random pattern)")
TRIGGERS.add("blended", BlendTrigger, "Blended: alpha blend of a fixed seeded random pattern")


def build_trigger(spec: TriggerSpec | dict, image_shape) -> Trigger:
    spec = TriggerSpec.from_json(spec) if isinstance(spec, dict) else spec
    return TRIGGERS.get(spec.kind)(spec, tuple(image_shape))


def poison_indices(n: int, rate: float, seed: int) -> list[int]:
    """Indices of the training samples to stamp and relabel (drawn uniformly from all, BackdoorBench style)."""
    if not 0 <= rate <= 1:
        raise NetmendError(f"poison rate must be in [0, 1], got {rate}")
    g = torch.Generator().manual_seed(int(seed) + 7919)
    k = int(round(rate * n))
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def stamp_batched(trigger: Trigger, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([trigger.apply(x[i: i + batch]) for i in range(0, len(x), batch)]) if len(x) else x.clone()
