"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping trigger (BackdoorBench's construction).

The trigger is a fixed, seeded smooth warp; its cleansed twin is simply the unwarped image.
Training uses the "noise mode": besides the ρ·N warped, relabelled samples, cross_ratio·ρ·N
other samples get the warp plus random noise and keep their label, so the model learns *this*
warp and not warps in general. netmend precomputes this poisoned subset once (BackdoorBench
poisons on the fly per batch); the record says so.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import NetmendError
from ..registry import TRIGGERS
from .triggers import Trigger, TriggerSpec

DEFAULTS = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}


def warp_grid(k: int, s: float, h: int, w: int, seed: int, grid_rescale: float = 1.0) -> torch.Tensor:
    """The sampling grid G (1×H×W×2, x/y order for grid_sample) of WaNet, deterministic for a seed."""
    g = torch.Generator().manual_seed(int(seed))
    p = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    p = p / p.abs().mean()
    flow = F.interpolate(p, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return torch.clamp((identity_grid(h, w) + s * flow / h) * grid_rescale, -1, 1)


def identity_grid(h: int, w: int) -> torch.Tensor:
    """The sampling grid (1×H×W×2, x/y order) that leaves an H×W image as it is."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=2)[None]


def resample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of images x (N×C×H×W) on grid (1 or N ×H×W×2), align_corners=True; the border
    extends outwards."""
    grid = grid.to(x.device, x.dtype).expand(len(x), *grid.shape[1:])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`resample`, kept in the pixel range [0, 1]."""
    return resample(x, grid).clamp(0, 1)


class WarpTrigger(Trigger):
    """WaNet warp: params k (control grid size), s (strength), grid_rescale, cross_ratio; seed = grid seed."""

    def __init__(self, spec: TriggerSpec, image_shape):
        super().__init__(spec, image_shape)
        unknown = sorted(set(spec.params) - set(DEFAULTS))
        if unknown:
            raise NetmendError(f"unknown WaNet parameter(s) {unknown}; valid: {sorted(DEFAULTS)}")
        p = {**DEFAULTS, **spec.params}
        self.k, self.s = int(p["k"]), float(p["s"])
        self.grid_rescale, self.cross_ratio = float(p["grid_rescale"]), float(p["cross_ratio"])
        if self.k < 2:
            raise NetmendError(f"WaNet grid size k must be ≥ 2, got {self.k}")
        if self.s <= 0:
            raise NetmendError(f"WaNet strength s must be > 0, got {self.s}")
        if self.cross_ratio < 0:
            raise NetmendError(f"WaNet cross_ratio must be ≥ 0, got {self.cross_ratio}")
        _, h, w = self.image_shape
        self.grid = warp_grid(self.k, self.s, h, w, spec.seed, self.grid_rescale)
        shift = (self.grid[0] - identity_grid(h, w)[0]).abs() * torch.tensor([(w - 1) / 2, (h - 1) / 2])
        # where pixels move (by more than 1% of a pixel): nearly the whole image for a global warp
        self.mask = (shift.amax(-1) > 0.01).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return warp(x, self.grid) if len(x) else x.clone()

    def noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-mode ("cross") samples: the warp plus U(−1, 1)/H per sample, labels kept."""
        _, h, w = self.image_shape
        noise = (torch.rand(len(x), h, w, 2, generator=generator) * 2 - 1) / h
        return warp(x, torch.clamp(self.grid + noise, -1, 1))

    def poison_training(self, x: torch.Tensor, y: torch.Tensor, pidx: torch.Tensor, target: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Warp and relabel x[pidx]; warp+noise cross_ratio·|pidx| other samples, labels kept."""
        x, y = x.clone(), y.clone()
        g = torch.Generator().manual_seed(int(seed) + 4049)
        pset = set(pidx.tolist())
        others = torch.tensor([i for i in torch.randperm(len(y), generator=g).tolist() if i not in pset], dtype=torch.long)
        cidx = others[: int(round(self.cross_ratio * len(pidx)))]
        for i in range(0, len(pidx), 4096):
            b = pidx[i: i + 4096]
            x[b] = self.apply(x[b])
        y[pidx] = int(target)
        for i in range(0, len(cidx), 4096):
            b = cidx[i: i + 4096]
            x[b] = self.noisy(x[b], g)
        return x, y, {"noise_mode": True, "cross": int(len(cidx)), "cross_ratio": self.cross_ratio,
                      "poisoning": "precomputed fixed subset (BackdoorBench poisons on the fly per batch)"}


TRIGGERS.add("wanet", WarpTrigger, "WaNet: seeded smooth warp (params k, s, grid_rescale, cross_ratio), noise-mode poisoning")


def wanet_spec(k: int = 4, s: float = 0.5, seed: int = 0, **params) -> TriggerSpec:
    """A TriggerSpec for WaNet with its parameters in `params`."""
    return TriggerSpec(kind="wanet", seed=seed, params={"k": k, "s": s, **params})
