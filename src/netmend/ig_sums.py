"""Integrated gradients summed over a group of input elements, by forward-mode differentiation.

IG's attribution of element p is x_p ∫₀¹ ∂f/∂x_p(αx) dα (black baseline), so its sum over a group of elements G is
the integral along the path of one directional derivative, ∫₀¹ ∇f(αx) · (x ⊙ 1_G) dα. A forward-mode pass gives that
derivative directly (a Jacobian-vector product: the model run once on dual numbers), where backward mode first builds
the whole gradient map. Two gains follow for a metric that only needs such sums (feature leakage's net leakage):
- one forward-mode pass per path point instead of a forward and a backward pass;
- **candidate edits share the pass**. An edit of one Linear/Conv2d weight changes that layer's output by ΔW k, linear
  in its input k, so the dual numbers captured at the layer (k and its tangent) give every candidate's changed
  output at once, and only the model's suffix from that layer runs per candidate.

The quadrature is Captum's default for `IntegratedGradients`: Gauss-Legendre nodes and weights on [0, 1], so the
sums agree with Captum's maps summed over the group to float32 rounding (tests/test_ig_sums.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .hooks import capture, carried_at, run_from

# an edit as the change of one layer's output: (layer name, k ↦ ΔW k), linear in the layer's input k
OutputChange = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def gauss_legendre(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes α and weights w on [0, 1]: ∫₀¹ g(α) dα ≈ Σ w g(α) (exact for polynomials of degree < 2·steps)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * weights)


def _path(x: torch.Tensor, masks: list[torch.Tensor], alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Path points α·x (steps × groups × n, flattened) and their tangents x ⊙ mask_g."""
    s, g = len(alphas), len(masks)
    points = (alphas.to(x).view(s, 1, *([1] * x.dim())) * x[None, None]).expand(s, g, *x.shape)
    tangents = torch.stack([x * m.to(x) for m in masks])[None].expand(s, g, *x.shape)
    return points.reshape(-1, *x.shape[1:]), tangents.reshape(-1, *x.shape[1:])


def _sums(out: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, groups: int) -> torch.Tensor:
    """From the output's tangent over the path, the target logit's integral per group and image: groups × n."""
    tangent = fwAD.unpack_dual(out).tangent
    n = len(y)
    t = tangent.reshape(len(weights), groups, n, -1).gather(3, y.to(tangent.device)[None, None, :, None].expand(
        len(weights), groups, n, 1))[..., 0]
    return torch.einsum("s,sgn->gn", weights.to(t), t)


@torch.no_grad()
def ig_group_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: list[torch.Tensor], steps: int = 16,
                  changes: list[OutputChange] | None = None, chunk: int = 2048) -> list[torch.Tensor]:
    """Σ_{p ∈ G} IG_p(x) of the target logit y, for each group mask G, black baseline. A mask is 1 inside the group
    and broadcasts to x, with a leading dimension of len(x) (one mask per image) or of 1 (the same for all).

    Without `changes`: one tensor, groups × n, for the model as it is. With `changes`: one such tensor per change,
    for the model with that change applied alone (the model itself is never modified)."""
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    alphas, weights = gauss_legendre(steps)
    per = max(1, chunk // (steps * len(masks)))          # images per pass
    layers = sorted({layer for layer, _ in changes}) if changes else []
    parts: list[list[torch.Tensor]] = [[] for _ in (changes or [None])]
    for lo in range(0, len(y), per):
        xb, yb = x[lo: lo + per].to(dev), y[lo: lo + per]
        mb = [m[lo: lo + per] if m.shape[0] == len(y) else m for m in masks]
        points, tangents = _path(xb, mb, alphas)
        with fwAD.dual_level():
            dual = fwAD.make_dual(points, tangents)
            if not changes:
                parts[0].append(_sums(model(dual), yb, weights, len(masks)).cpu())
                continue
            with capture(model, layers, detach=False) as cap:
                model(dual)
            carry = {layer: carried_at(model, layer, dual) for layer in layers}
            for i, (layer, change) in enumerate(changes):
                h = cap.outputs[layer] + change(cap.inputs[layer])
                parts[i].append(_sums(run_from(model, layer, h, dual, carry[layer]), yb, weights, len(masks)).cpu())
    return [torch.cat(p, 1) if p else torch.zeros(len(masks), 0) for p in parts]
