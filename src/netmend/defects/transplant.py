"""Carrying the evidence pairs' corruption onto other inputs: pasted, added, or warped.

Only the pairs (x̃, x) are known, not the attack. Which kind of corruption they show decides how it is carried:
- **paste**: x̃ − x is confined to a patch (at most `sparse` of the positions differ): x̃'s values there are pasted.
- **warp**: a dense difference that a smooth resampling of x explains (WaNet-style warps, small rotations or
  shifts): one sampling grid, shared by all pairs, is fitted to them and applied to the new inputs. Adding x̃ − x
  of one image to another carries nothing of a warp: on a WaNet model the added difference pulls 3 % of the
  probe samples to the target, the fitted warp 99 % — the same as the attack's own warp.
- **add**: any other dense difference (a blend, a signal): x̃ − x is added.

The warp is a flow field on a k × k control grid, upsampled bicubically to the image (the construction WaNet
itself uses), fitted by least squares on the pairs. k grows (2, 3, 4, 6, 8) until the fit explains `WARP_R2` of
the pairs' difference; a difference no such grid explains is not a warp (a blend or a signal: a 4 × 4 grid
explains under a tenth of it, and the search stops there). Coarser grids are tried first so that the fewest
parameters that explain the pairs are used; each finer fit starts from the coarser one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.wanet import identity_grid, resample       # the resampling WaNet's own trigger uses

WARP_GRIDS = (2, 3, 4, 6, 8)     # control grid sizes tried, coarse to fine
WARP_R2 = 0.99                   # share of the pairs' squared difference a warp must explain
WARP_STEPS = 300                 # Adam steps per grid size
SPARSE = 0.25                    # a difference at no more than this share of the positions is a patch


@dataclass
class Warp:
    """A fitted sampling grid (1×H×W×2, x/y order, align_corners) and how much of the pairs it explains."""

    grid: torch.Tensor
    k: int
    r2: float

    def apply(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return resample(x, self.grid).clamp(lo, hi)


def _flow(ctrl: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def fit_warp(clean: torch.Tensor, corrupted: torch.Tensor, grids=WARP_GRIDS, r2: float = WARP_R2,
             steps: int = WARP_STEPS) -> Warp | None:
    """The coarsest smooth warp that maps the clean images onto the corrupted ones (R² ≥ r2), or None."""
    x, target = clean.detach().float(), corrupted.detach().float()
    _, _, h, w = x.shape
    lo, hi = torch.minimum(x.min(), target.min()), torch.maximum(x.max(), target.max())
    energy = float(((target - x) ** 2).sum())
    if energy <= 0:
        return None
    ident = identity_grid(h, w)
    ctrl = torch.zeros(1, 2, grids[0], grids[0])
    with torch.enable_grad():
        for k in grids:
            ctrl = F.interpolate(ctrl, size=(k, k), mode="bilinear", align_corners=True).clone().requires_grad_(True)
            opt = torch.optim.Adam([ctrl], lr=0.01)
            for _ in range(steps):
                loss = ((resample(x, ident + _flow(ctrl, h, w)).clamp(lo, hi) - target) ** 2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            ctrl = ctrl.detach()
            grid = ident + _flow(ctrl, h, w)
            explained = 1 - float(((resample(x, grid).clamp(lo, hi) - target) ** 2).sum()) / energy
            if explained >= r2:
                return Warp(grid, k, explained)
            if k >= 4 and explained < 0.5:      # a 4 × 4 grid explains most of any smooth warp: not one
                return None
    return None


def changed_positions(diff: torch.Tensor) -> torch.Tensor:
    """Where x̃ differs from x; for images, a position differs if any channel does."""
    changed = diff.abs() > 1e-6
    if diff.dim() == 4:
        changed = changed.any(1, keepdim=True).expand_as(diff)
    return changed


def changed_share(corrupted: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per pair, the share of the input's positions where x̃ differs from x (≤ `SPARSE`: a patch)."""
    return changed_positions(corrupted - clean).flatten(1).float().mean(1)


def carry(corrupted: torch.Tensor, clean: torch.Tensor, x: torch.Tensor, sparse: float = SPARSE,
          warp: Warp | None = None) -> torch.Tensor:
    """x (cycling through the pairs) carrying the pairs' corruption: pasted, warped (when `warp` is given) or
    added; the result stays inside the value range of x and x̃."""
    diff = corrupted - clean
    changed = changed_positions(diff)
    frac = changed_share(corrupted, clean)
    j = torch.arange(len(x)) % len(clean)
    paste = (frac[j] <= sparse).view(-1, *[1] * (diff.dim() - 1))
    lo = torch.minimum(x.min(), corrupted.min())
    hi = torch.maximum(x.max(), corrupted.max())
    dense = warp.apply(x, lo, hi) if warp is not None else (x + diff[j]).clamp(lo, hi)
    return torch.where(paste, torch.where(changed[j], corrupted[j], x), dense)


def warp_of(corrupted: torch.Tensor, clean: torch.Tensor, sparse: float = SPARSE) -> Warp | None:
    """The pairs' warp, when they are images whose every difference is dense and a smooth warp explains it."""
    if corrupted.dim() != 4 or min(corrupted.shape[-2:]) < 4 or not len(clean):
        return None
    if bool((changed_share(corrupted, clean) <= sparse).any()):
        return None
    return fit_warp(clean, corrupted)


def carried_as(corrupted: torch.Tensor, clean: torch.Tensor, warp: Warp | None, sparse: float = SPARSE) -> str:
    """How `carry` moves these pairs' corruption: "paste", "add", "warp (k = …, R² …)", or a mix ("paste + add")."""
    if not len(clean):
        return "none"
    frac = changed_share(corrupted, clean)
    kinds = []
    if bool((frac <= sparse).any()):
        kinds.append("paste")
    if bool((frac > sparse).any()):
        kinds.append(f"warp (k = {warp.k}, R² {warp.r2:.3f})" if warp is not None else "add")
    return " + ".join(kinds)
