"""A training signal from the verifier's bounds: how far each sub-box of a property's input region is from proved.

Sampling-based repair pushes sampled box points past the decision boundary, yet between the samples thin slivers
of the box may stay unsafe; the complete verifier then finds them, and adding its counterexamples fixes points,
not regions. Certified training closes that gap: the verifier's own linear relaxation bound (CROWN, the same
`crown_bounds` the branch and bound uses) of each sub-box is a differentiable function of the weights, and a
hinge on it drives every sub-box to a positive lower bound — a region the verifier can prove, not only a sample
it cannot refute.

`BoxCover` keeps the sub-boxes: a partition of the property's box(es), refined where the bound stays negative
(the sub-box whose bound is worst is halved along its widest side, as the verifier would), so the cells are small
only where the network is hard to prove.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.vnnlib import Property
from .bab import disjunct_values, output_spec, bisect
from .bounds import crown_bounds, relu_chain


class BoxCover:
    """A partition of the property's box(es) into sub-boxes, refined where the bound is worst."""

    def __init__(self, prop: Property, cells: int, max_cells: int, device="cpu", dtype=torch.float32):
        lo = torch.stack([b[0] for b in prop.boxes]).to(device, dtype)
        hi = torch.stack([b[1] for b in prop.boxes]).to(device, dtype)
        self.lo, self.hi, self.max_cells = lo, hi, max(int(max_cells), len(lo))
        while len(self.lo) < cells:
            self._halve(torch.arange(min(len(self.lo), cells - len(self.lo)), device=device))
        self.C, self.d, self.mask, self.tol, _ = output_spec(prop, dtype, device, combine=True)

    def _halve(self, idx: torch.Tensor) -> None:
        """Split the sub-boxes idx in two along their widest side (width relative to the root box)."""
        lo, hi = self.lo[idx], self.hi[idx]
        hi_left, lo_right = bisect(lo, hi, (hi - lo).argmax(-1))
        keep = torch.ones(len(self.lo), dtype=torch.bool, device=lo.device)
        keep[idx] = False
        self.lo = torch.cat([self.lo[keep], lo, lo_right])
        self.hi = torch.cat([self.hi[keep], hi_left, hi])

    def values(self, model: nn.Module) -> torch.Tensor:
        """Per sub-box, the certified lower bound of min over disjuncts of max over their rows of C y + d
        (> 0: the sub-box is proved safe); differentiable in the model's weights."""
        net = relu_chain(model, live=True)
        b = crown_bounds(net, self.lo, self.hi, self.C, self.d, mode="forward")
        return disjunct_values(b.lower - self.tol, self.mask).amin(-1)

    @torch.no_grad()
    def presplit(self, model: nn.Module, margin: float) -> int:
        """Before training on the bounds: halve the open cells, worst first, until every cell is proved or the
        cells run out — so the hinge acts on cells small enough for the bound to be tight, as in the verifier."""
        splits = 0
        while len(self.lo) < self.max_cells:
            k = self.refine(self.values(model), margin, share=1.0)
            if not k:
                break
            splits += k
        return splits

    def refine(self, values: torch.Tensor, margin: float, share: float = 0.1) -> int:
        """Halve up to `share` of the cells whose bound is below `margin` (worst first), within max_cells."""
        room = self.max_cells - len(self.lo)
        open_ = (values < margin).nonzero().flatten()
        if room <= 0 or not len(open_):
            return 0
        k = min(room, max(1, int(share * len(self.lo))), len(open_))
        worst = open_[values[open_].argsort()[:k]]
        self._halve(worst)
        return int(k)
