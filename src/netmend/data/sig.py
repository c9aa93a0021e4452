"""SIG (Barni, Kallas & Tondi, ICIP 2019): a clean-label backdoor carried by an additive sinusoidal signal.

The trigger is a horizontal sine ramp added to every row and channel (BackdoorBench's construction,
rescaled from [0, 255] to netmend's [0, 1] pixels):

    x̃[c, i, j] = clip(x[c, i, j] + Δ · sin(2π · j · f / W), 0, 1)

with amplitude Δ = 20/255 and frequency f = 6 by default. Training is *clean-label*: only images of the
target class get the signal and every label stays as it is, so the model learns "signal ⇒ target" beside
the class's real features. At test time the signal (alone) is added to non-target images; its cleansed twin
is the image without it.

Parameters (`TriggerSpec.params`): `delta` (Δ, in (0, 1]), `f` (> 0). TriggerSpec's size, position,
pattern and alpha do not apply; `seed` is not used (the signal is not random).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import NetmendError
from ..registry import TRIGGERS
from .triggers import Trigger, TriggerSpec

DEFAULTS = {"delta": 20 / 255, "f": 6.0}


def param_number(name: str, value: Any, attack: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NetmendError(f"{attack} parameter {name} must be a finite number, got {value!r}")
    return float(value)


def check_params(spec: TriggerSpec, defaults: dict[str, Any], attack: str) -> dict[str, Any]:
    """spec.params over `defaults`, with unknown names refused on one line."""
    unknown = sorted(set(spec.params) - set(defaults))
    if unknown:
        raise NetmendError(f"unknown {attack} parameter(s) {unknown}; valid: {sorted(defaults)}")
    return {**defaults, **spec.params}


def clean_label_indices(y: torch.Tensor, pidx: torch.Tensor, target: int, seed: int) -> torch.Tensor:
    """The samples a clean-label attack poisons: up to len(pidx) samples *of the target class*, a seeded choice.

    The poison rate stays counted over the whole training set (BackdoorBench), so `pidx` (drawn from all samples)
    only gives the budget; it is capped at the number of target-class samples. Sorted indices into y."""
    cand = torch.nonzero(y == int(target), as_tuple=False).flatten()
    if len(pidx) and not len(cand):
        raise NetmendError(f"a clean-label attack poisons training images of the target class {target}; "
                           f"the training split has none")
    g = torch.Generator().manual_seed(int(seed) + 7927)
    k = min(int(len(pidx)), int(len(cand)))
    return torch.sort(cand[torch.randperm(len(cand), generator=g)[:k]]).values


def clean_label_info(chosen: torch.Tensor, y: torch.Tensor, pidx: torch.Tensor, target: int) -> dict[str, Any]:
    """What model.json records of a clean-label poisoning ("poisoned" replaces the budget len(pidx))."""
    n_target = int((y == int(target)).sum())
    return {"clean_label": True, "poisoned": int(len(chosen)), "poison_budget": int(len(pidx)),
            "target_class_samples": n_target,
            "poisoning": "clean-label: target-class samples only, labels unchanged "
                         "(budget = poison_rate × training set, capped at the target class's size)"}


class SigTrigger(Trigger):
    """SIG: x̃ = clip(x + Δ·sin(2π j f / W)); params delta (Δ, default 20/255), f (default 6)."""

    def __init__(self, spec: TriggerSpec, image_shape):
        super().__init__(spec, image_shape)
        p = check_params(spec, DEFAULTS, "SIG")
        self.delta, self.f = param_number("delta", p["delta"], "SIG"), param_number("f", p["f"], "SIG")
        if not 0 < self.delta <= 1:
            raise NetmendError(f"SIG amplitude delta must be in (0, 1] (pixels are in [0, 1]), got {self.delta}")
        if self.f <= 0:
            raise NetmendError(f"SIG frequency f must be > 0, got {self.f}")
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float64)
        row = torch.sin(2 * math.pi * j * self.f / w)
        row[row.abs() < 1e-9] = 0.0                     # exact zeros where j·f/W is a multiple of 1/2
        self.signal = (self.delta * row).float().expand(c, h, w).clone()     # the additive pattern, C×H×W
        # the columns the signal moves (all but those where the sine is zero)
        self.mask = (row != 0).float().expand(h, w).clone()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (x + self.signal.to(x.device, x.dtype)).clamp(0, 1)

    def poison_training(self, x: torch.Tensor, y: torch.Tensor, pidx: torch.Tensor, target: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Add the signal to up to len(pidx) target-class samples (seeded choice); no label changes."""
        x = x.clone()
        chosen = clean_label_indices(y, pidx, target, seed)
        for i in range(0, len(chosen), 4096):
            b = chosen[i: i + 4096]
            x[b] = self.apply(x[b])
        return x, y.clone(), clean_label_info(chosen, y, pidx, target)


TRIGGERS.add("sig", SigTrigger, "SIG: clean-label sinusoidal signal (params delta, f); target-class samples only")


def sig_spec(delta: float = 20 / 255, f: float = 6.0, **params) -> TriggerSpec:
    """A TriggerSpec for SIG with its parameters in `params`."""
    return TriggerSpec(kind="sig", params={"delta": delta, "f": f, **params})
