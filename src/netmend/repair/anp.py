"""Adversarial Neuron Pruning (ANP; Wu & Wang, NeurIPS 2021), a peer backdoor defence.

ANP learns a mask m_k ∈ [0, 1] per neuron on clean data while the neurons are perturbed adversarially, then prunes
the neurons whose mask stays low. Backdoor neurons are the ones whose small multiplicative perturbation already
wrecks the clean loss (the backdoor is a fragile, high-gain path); the robust part of the objective drives their
masks towards 0, the natural part keeps the masks of the neurons clean accuracy needs.

Per iteration, on a batch (x, y) of clean repair data (sampled with replacement, as BackdoorBench's RandomSampler):

1. δ, ξ ~ U(−ε, ε) per neuron, then `perturb_steps` signed-gradient ascent steps of size ε/steps on
   CE(f(x; m + δ, m + ξ), y), each clipped back to [−ε, ε];
2. L = α · CE(f(x; m, m), y) + (1 − α) · CE(f(x; m + δ, m + ξ), y); one SGD step on m (lr 0.2, momentum 0.9),
   then m is clipped to [0, 1].

Finally the neurons with m ≤ `threshold` (or the `fraction` with the smallest m, ranked over all layers) are pruned:
their output is zeroed by zeroing their weight row and bias (or BN γ and β). The result is an ordinary model of the
same architecture; the Edit is a weight delta.

Neurons. With BatchNorm layers (`units="auto"` on a BN model, or `"bn"`), the neurons are BN channels, as in the
reference: f(x; a, b) scales γ by a and β by b. Without BN (`"layers"`), they are the output units / channels of
every Linear and Conv2d except the last one run (the classifier head): the unit's weight row is scaled by a, its
bias by b, so the unit's pre-activation is a·(W_k x) + b·b_k. Masks and perturbations are applied by substituting
scaling each neuron's output during the forward pass (hooks.forward_hooks, removed after every call): scaling the
output's weight part by a and its bias part by b equals scaling the weight row and bias, without computing weight
gradients.

Differences from the reference code (csdongxian/ANP_backdoor, BackdoorBench defense/anp.py):
- the mask scales a neuron's weight *and* bias (the reference masks only BN γ and prunes by zeroing γ), so that
  mask 0 is exactly the pruned neuron (zero output) — the masked model at the learnt masks is the pruned model;
  the bias perturbation is m + ξ instead of 1 + ξ (the same at m = 1);
- δ, ξ are clipped to [−ε, ε] after each ascent step (the paper's constraint; the reference leaves them unclipped,
  so they can reach 2ε);
- the model stays in eval mode (BN running statistics, no dropout); the reference trains masks in train mode;
- the pruning level is not chosen by the attack's test ASR (BackdoorBench sweeps thresholds and keeps the one with
  the lowest *test* ASR): the fixed threshold is applied, and lowered in `step`s only while clean *validation*
  accuracy falls by more than `max_acc_drop` (relative, BackdoorBench's acc_ratio).
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import require
from ..hooks import execution_order, forward_hooks, get_layer, weight_layers
from ..methods import MethodPreset
from ..metrics import accuracy, predict
from ..progress import progress
from ..registry import METHODS, REPAIRERS
from ..sites import Sites

log = logging.getLogger("netmend")

ANP_PAPER = "Wu & Wang, NeurIPS 2021"


@dataclass
class AnpConfig:
    eps: float = 0.4                 # ε: bound of the multiplicative neuron perturbations δ, ξ (BackdoorBench anp_eps)
    perturb_steps: int = 1           # signed-gradient ascent steps on δ, ξ per iteration, size ε/steps (anp_steps)
    alpha: float = 0.2               # weight of the natural loss; 1 − α weighs the perturbed loss (anp_alpha)
    mask_lr: float = 0.2             # SGD (momentum 0.9) learning rate of the masks (BackdoorBench lr)
    iterations: int = 2000           # mask updates, one batch each (BackdoorBench nb_iter)
    batch_size: int = 128            # clean samples per batch, drawn with replacement
    pruning_by: str = "threshold"    # threshold: prune masks ≤ threshold | fraction: prune the smallest masks
    threshold: float = 0.2           # mask value at or below which a neuron is pruned (the paper's 0.2)
    fraction: float = 0.05           # share of all neurons pruned when pruning_by is fraction
    step: float = 0.05               # back-off step of threshold / fraction when validation accuracy drops (pruning_step)
    max_acc_drop: float | None = 0.1  # relative validation-accuracy drop allowed (acc_ratio); None: no back-off
    units: str = "auto"              # auto: BN channels if the model has BatchNorm, else layers | bn | layers
    use_pairs: bool = False          # add the evidence pairs' cleansed twins to the clean data (ANP uses clean data only)
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class NeuronGroup:
    """The neurons of one module: its output units (Linear / Conv2d) or channels (BatchNorm)."""
    layer: str
    weight: str               # parameter names scaled per neuron (dim 0)
    bias: str | None
    size: int


def neuron_groups(model: nn.Module, x: torch.Tensor, units: str = "auto") -> list[NeuronGroup]:
    """The neurons ANP masks: every affine BatchNorm's channels (`bn`), or the output units of every Linear / Conv2d
    but the last one run (`layers`); `auto` picks bn when the model has an affine BatchNorm."""
    require(units in ("auto", "bn", "layers"), f"units must be 'auto', 'bn' or 'layers', got {units!r}")
    bns = [n for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if units == "auto":
        units = "bn" if bns else "layers"
    if units == "bn":
        require(bool(bns), "units='bn' needs a model with affine BatchNorm layers")
        names = bns
    else:
        known = set(weight_layers(model))
        order = [n for n in execution_order(model, x) if n in known]
        require(len(order) >= 2, "ANP needs at least two Linear/Conv2d layers (the last one, the head, is not masked)")
        names = order[:-1]
    groups = []
    for n in names:
        m = get_layer(model, n)
        bias = f"{n}.bias" if getattr(m, "bias", None) is not None else None
        groups.append(NeuronGroup(n, f"{n}.weight", bias, int(m.weight.shape[0])))
    return groups


def _scale(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return t * c.view(-1, *([1] * (t.dim() - 1)))


def _unit_view(module: nn.Module, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """c shaped to broadcast over `out`: a Linear's units are its last dimension, a conv's / BN's dimension 1."""
    if isinstance(module, nn.Linear):
        return c
    return c.view(1, -1, *([1] * (out.dim() - 2)))


class MaskedNet:
    """f(x; a, b): the model with each group's neurons scaled, a on the weight part and b on the bias part of the
    neuron's output, out_k ↦ a_k·(out_k − bias_k) + b_k·bias_k — the same as scaling the neuron's weight row by a_k
    and its bias by b_k (a BN channel: γ by a_k, β by b_k). One vector per group. Applied with hooks.forward_hooks
    for the duration of one call; the model's own tensors never change."""

    def __init__(self, model: nn.Module, groups: list[NeuronGroup]):
        self.model, self.groups = model, groups
        self.modules = [get_layer(model, g.layer) for g in groups]
        params = dict(model.named_parameters())
        self.bias = [params[g.bias].detach() if g.bias else None for g in groups]

    def __call__(self, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        def scaled(module, _inp, out, ca, cb, bias):
            va = _unit_view(module, ca, out)
            if bias is None:
                return out * va
            return out * va + _unit_view(module, (cb - ca) * bias, out)

        hooks = [(m, functools.partial(scaled, ca=ca, cb=cb, bias=bias))
                 for m, ca, cb, bias in zip(self.modules, a, b, self.bias)]
        with forward_hooks(hooks):
            return self.model(x)


def adversarial_perturbation(net: MaskedNet, x: torch.Tensor, y: torch.Tensor, mask: list[torch.Tensor], eps: float,
                             steps: int, generator: torch.Generator, output=None
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ANP's inner maximisation: δ, ξ ~ U(−ε, ε) per neuron, then `steps` signed ascent steps of size ε/steps on the
    loss of f(x; m + δ, m + ξ), clipped to [−ε, ε] after each. Returns (δ, ξ), detached."""
    out = output or (lambda z: z)
    mask = [m.detach() for m in mask]

    def uniform(m):
        return ((torch.rand(m.shape, generator=generator) * 2 - 1) * eps).to(m)

    dw, db = [uniform(m) for m in mask], [uniform(m) for m in mask]
    for _ in range(steps):
        dw = [d.requires_grad_(True) for d in dw]
        db = [d.requires_grad_(True) for d in db]
        loss = F.cross_entropy(out(net(x, [m + d for m, d in zip(mask, dw)], [m + d for m, d in zip(mask, db)])), y)
        grads = torch.autograd.grad(loss, dw + db)
        with torch.no_grad():
            moved = [(d + eps / steps * g.sign()).clamp_(-eps, eps) for d, g in zip(dw + db, grads)]
        dw, db = moved[: len(dw)], moved[len(dw):]
    return [d.detach() for d in dw], [d.detach() for d in db]


def learn_masks(model: nn.Module, groups: list[NeuronGroup], x: torch.Tensor, y: torch.Tensor, cfg: AnpConfig,
                output=None) -> list[torch.Tensor]:
    """ANP's mask optimisation; returns one mask vector in [0, 1] per group (on the CPU)."""
    net = MaskedNet(model, groups)
    dev = next(model.parameters()).device
    masks = [torch.ones(g.size, device=dev, requires_grad=True) for g in groups]
    opt = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = x.to(dev), y.to(dev)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:                     # gradients reach the masks only: no weight gradients are computed
        p.requires_grad_(False)
    try:
        _mask_loop(net, masks, opt, g, x, y, cfg, output)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return [m.detach().cpu() for m in masks]


def _mask_loop(net: MaskedNet, masks: list[torch.Tensor], opt, g: torch.Generator, x: torch.Tensor, y: torch.Tensor,
               cfg: AnpConfig, output) -> None:
    out = output or (lambda z: z)
    dev = x.device
    with progress("anp: learning neuron masks", total=cfg.iterations) as bar:
        for _ in range(cfg.iterations):
            b = torch.randint(len(x), (cfg.batch_size,), generator=g).to(dev)
            xb, yb = x[b], y[b]
            loss = cfg.alpha * F.cross_entropy(out(net(xb, masks, masks)), yb)
            if cfg.eps > 0:
                dw, db = adversarial_perturbation(net, xb, yb, masks, cfg.eps, cfg.perturb_steps, g, output)
                rob = out(net(xb, [m + d for m, d in zip(masks, dw)], [m + d for m, d in zip(masks, db)]))
                loss = loss + (1 - cfg.alpha) * F.cross_entropy(rob, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0, 1)
            bar.advance()


def prune_neurons(model: nn.Module, groups: list[NeuronGroup], pruned: list[torch.Tensor]) -> None:
    """Zero the output of the pruned neurons (bool vector per group): their weight rows and biases become 0."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g, p in zip(groups, pruned):
            keep = (~p).to(params[g.weight].dtype).to(params[g.weight].device)
            params[g.weight].copy_(_scale(params[g.weight], keep))
            if g.bias:
                params[g.bias].mul_(keep)


def _selection(masks: list[torch.Tensor], cfg: AnpConfig, level: float) -> list[torch.Tensor]:
    """Pruned neurons (bool vector per group) at a threshold / fraction `level`."""
    if cfg.pruning_by == "threshold":
        return [m <= level for m in masks]
    flat = torch.cat(masks)
    k = int(round(level * len(flat)))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:k]] = True
    return list(chosen.split([len(m) for m in masks]))


def _check(cfg: AnpConfig) -> None:
    require(cfg.eps >= 0, f"eps must be ≥ 0, got {cfg.eps}")
    require(0 <= cfg.alpha <= 1, f"alpha must be in [0, 1], got {cfg.alpha}")
    require(cfg.pruning_by in ("threshold", "fraction"), f"pruning_by must be 'threshold' or 'fraction', got {cfg.pruning_by!r}")
    require(0 <= cfg.threshold <= 1, f"threshold must be in [0, 1], got {cfg.threshold}")
    require(0 <= cfg.fraction <= 1, f"fraction must be in [0, 1], got {cfg.fraction}")
    require(cfg.step > 0, f"step must be > 0, got {cfg.step}")
    require(cfg.max_acc_drop is None or 0 <= cfg.max_acc_drop <= 1,
            f"max_acc_drop must be in [0, 1] or None, got {cfg.max_acc_drop}")
    require(cfg.eps == 0 or cfg.perturb_steps >= 1, "perturb_steps must be ≥ 1 when eps > 0")


@REPAIRERS.register("anp", "ANP: learn neuron masks under adversarial neuron perturbation, prune the low ones",
                    config=AnpConfig, needs=("argmax",))
def anp(model: nn.Module, defect: Defect, sites: Sites | None, cfg: AnpConfig) -> Edit:
    _check(cfg)
    if sites is not None and len(sites):
        log.warning("anp chooses its own neurons: the localiser's sites are ignored")
    work = copy.deepcopy(model).to(cfg.device).eval()
    before = {k: v.detach().clone() for k, v in work.state_dict().items()}
    x, y = defect.tuning_set(cfg.use_pairs)
    require(len(x) > 0, "anp needs clean repair data")
    groups = neuron_groups(work, x, cfg.units)
    masks = learn_masks(work, groups, x, y, cfg, output=defect.decision_logits)
    level = cfg.threshold if cfg.pruning_by == "threshold" else cfg.fraction
    base = accuracy(predict(work, defect.repair.x_val), defect.repair.y_val) if len(defect.repair.y_val) else None
    w0 = {k: v.detach().clone() for k, v in work.named_parameters()}
    val = None
    while True:
        pruned = _selection(masks, cfg, level)
        prune_neurons(work, groups, pruned)
        if cfg.max_acc_drop is None or base is None:
            break
        val = accuracy(predict(work, defect.repair.x_val), defect.repair.y_val)
        if val >= base * (1 - cfg.max_acc_drop) or level <= 0:
            break
        level = max(0.0, level - cfg.step)        # back off: prune fewer neurons
        with torch.no_grad():
            for k, v in work.named_parameters():
                v.copy_(w0[k])
    work.cpu()
    n_pruned = {g.layer: int(p.sum()) for g, p in zip(groups, pruned) if p.any()}
    total = sum(g.size for g in groups)
    meta = {"repairer": "anp", "samples": len(y), "units": [g.layer for g in groups],
            "pruning_by": cfg.pruning_by, "level": level, "pruned": n_pruned,
            "pruned_fraction": sum(n_pruned.values()) / max(1, total), "neurons": total,
            "mask_quantiles": [float(q) for q in torch.quantile(torch.cat(masks), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))],
            "val_accuracy_before": base, "val_accuracy_after": val}
    return Edit.between(before, work, meta, names=[n for n, _ in work.named_parameters()])


METHODS.add("anp", MethodPreset(None, "anp", uses_pairs=False, paper=ANP_PAPER, defects=("backdoor",)),
            "ANP: prune neurons sensitive to adversarial neuron perturbation on clean data (peer defence)")
