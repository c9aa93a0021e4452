"""INNER's repair (docs/methods/inner.md): gradient-masked fine-tuning of the fault weights only.

Per round, each selected block is tuned through its probe (0.8·CE on defective inputs with their
true labels + 0.2·KD towards the probe's view of clean inputs), then the stopping rule is checked on
the repair *validation* split (clean accuracy within tolerance and violation rate below τ); if it
fails, `epoch2` passes of CE on the final output over an augmented defective set follow. Gradients
are multiplied by the mask and everything else is frozen, so the Edit touches only masked weights.
Neuron sites (CARE, attribution) become masks over those neurons' weight rows, or for a weightless
layer's neuron (CARE's flatten units) over the next weight layer's columns that read it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..defects.base import Defect
from ..edit import Edit
from ..errors import require
from ..hooks import forward_hook, get_layer, run_to
from ..locate.probe import (ProbeConfig, ProbeSet, defective_data, find_blocks, pooled, train_probes,
                            violation_rate)
from ..metrics import accuracy, predict
from ..methods import MethodPreset
from ..registry import METHODS, REPAIRERS
from ..sites import Sites
from ..train import masked_step

TAU = {"badnets": 0.15, "blended": 0.25, "wanet": 0.22, "adversarial": 0.22}   # INNER's τ, by scenario
EPOCH2 = {"blended": 1, "wanet": 4}                                           # INNER's, default 2
# Adversarial training on the fault weights is slow to converge: on the seed-7 dev model the validation violation
# still fell after round 20 (27 % → 23 %), and 40 rounds gave robust accuracy +37.6 instead of +33.9 points at the
# same clean accuracy (−0.91 / −0.94 pt).
ROUNDS = {"adversarial": 40}                                                  # default 20
# Robustness costs clean accuracy (adversarial training trades one for the other): 2 points there, 1 elsewhere.
# Wrong predictions are accuracy itself, so no loss is allowed: on the dev models (mislabelled seeds 7, 8, clean 7)
# four of five runs kept the same state or gained 0.2 pt; dev 7 with shirts-only evidence went from −0.67 pt (88.1 %
# of held-out errors fixed) to +0.33 pt (81.5 %).
ACC_TOLERANCE = {"adversarial": 0.02, "wrong-predictions": 0.0}


@dataclass
class MaskedTuneConfig:
    epochs: int | None = None            # outer rounds at most; default per defect: 20 (adversarial 40)
    lr: float = 7e-4
    momentum: float = 0.0
    batch_size: int = 64
    repair_sample_num: int = 1000        # defective samples (each pass pairs them with as many clean fit images)
    ce_weight: float = 0.8               # probe loss: ce_weight·CE + (1 − ce_weight)·KD
    kd_temperature: float = 3.0
    epoch2: int | None = None            # final-output passes per round; default per attack: 2 (blended 1, WaNet 4)
    acc_tolerance: float | None = None   # stop only if val accuracy ≥ before − this; default per defect (1 pp,
                                         # adversarial 2, wrong predictions 0)
    asr_threshold: float | None = None   # τ on the val violation rate; default per attack (INNER's)
    clean_weight: float = 0.0            # + this × CE of the final output on a clean batch (0: the code's loss)
    augment: bool = True                 # rotation ±30°, shift ±2 px, horizontal flip on the defective set
    refresh: bool = True                 # regenerate evidence the defect can regenerate (adversarial examples)
                                         # against the model under repair before every pass and check
    max_steps: int = 20000
    seed: int = 0
    device: str = "cpu"


def augment(x: torch.Tensor, g: torch.Generator, deg: float = 30.0, shift: float = 2.0) -> torch.Tensor:
    """Random rotation, translation and horizontal flip in one affine resampling (no torchvision)."""
    n, _, h, w = x.shape
    a = (torch.rand(n, generator=g) * 2 - 1) * math.radians(deg)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift * 2 / torch.tensor([w, h])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) * flip, -torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) * flip, torch.cos(a)
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), align_corners=False, padding_mode="zeros")


def kd_loss(out: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """KD_T(o, t) = −mean Σ softmax(t/T)·log_softmax(o/T) (batches need not be label-aligned)."""
    return -(F.softmax(teacher / temp, 1) * F.log_softmax(out / temp, 1)).sum(1).mean()


def masked_tune_defaults(defect: Defect, cfg: MaskedTuneConfig) -> dict:
    """INNER's settings per attack (the defect's variant: badnets, blended, wanet) and netmend's per defect kind."""
    v = defect.variant
    return {"epochs": ROUNDS.get(v, 20), "epoch2": EPOCH2.get(v, 2), "acc_tolerance": ACC_TOLERANCE.get(v, 0.01),
            "asr_threshold": TAU.get(v, 0.22)}


def _readout(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The output of layer `name` on `x` (with its autograd graph), stopping the forward pass there."""
    return run_to(model, name, x)


def _forward_with_readout(model: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    with forward_hook(get_layer(model, name), lambda _m, _i, o: out.append(o)):
        logits = model(x)
    return logits, out[0]


class _Tuner:
    """Holds the working copy, masks, optimiser steps and the validation bookkeeping."""

    def __init__(self, model, defect, masks, probes: ProbeSet | None, cfg: MaskedTuneConfig):
        self.model, self.defect, self.masks, self.probes, self.cfg = model, defect, masks, probes, cfg
        self.dev = cfg.device
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.steps = 0
        self.dd = defective_data(defect, cfg.repair_sample_num, cfg.seed)
        r = defect.repair
        # The clean term draws its batches from every clean fit image, not from a subset the size of the
        # defective set: on the dev Blended models (seeds 7-10) 0.4 point more test accuracy on average.
        perm = torch.randperm(len(r.y_fit), generator=self.g)
        self.x_clean, self.y_clean = r.x_fit[perm], r.y_fit[perm]
        self.weights = {n: get_layer(model, n).weight for n in masks}
        self.gmask = {n: m.to(self.dev) for n, m in masks.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.acc0 = self.val_accuracy()
        self.tol, self.tau = cfg.acc_tolerance, cfg.asr_threshold
        self.history: list[dict] = []

    def within_tolerance(self, acc: float) -> bool:
        """acc ≥ before − tolerance, exact at the boundary (600 validation images: 1 pp is 6 of them, and
        float32 rounding must not turn "exactly 1 point lower" into a rejection)."""
        return acc >= self.acc0 - self.tol - 1e-6

    def val_accuracy(self) -> float:
        return accuracy(predict(self.model, self.defect.repair.x_val, device=self.dev), self.defect.repair.y_val)

    def refresh(self, split: str) -> None:
        """Adversarial evidence made against the unrepaired model stops being adversarial once the weights
        move; the metric attacks the repaired model afresh, so the tuner does too (adversarial training)."""
        dd = self.dd
        clean = dd.c_fit if split == "fit" else dd.c_val
        if not self.cfg.refresh or clean is None or not len(clean):
            return
        fresh = self.defect.regenerate(self.model, clean)
        if split == "fit":
            dd.x_fit = fresh
        else:
            dd.x_val = fresh

    def check(self, stage: str) -> bool:
        self.refresh("val")
        acc = self.val_accuracy()
        rate = violation_rate(self.defect, self.model, self.dd.x_val, self.dd.y_val, self.dev)
        ok_acc = self.within_tolerance(acc)
        self.history.append({"stage": stage, "steps": self.steps, "val_accuracy": acc, "val_violation": rate,
                             "state": {n: w.detach().clone() for n, w in self.weights.items()}})
        return ok_acc and (math.isnan(rate) or rate < self.tau)

    def _step(self, params: list[torch.Tensor], loss: torch.Tensor, opt) -> None:
        masked_step(opt, loss, {w: self.gmask[n] for n, w in self.weights.items()})
        self.steps += 1

    def _opt(self, names: list[str]):
        params = [self.weights[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        return params, torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum)

    def _release(self, params):
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    def probe_pass(self, name: str) -> None:
        """One pass over (defective, clean) batch pairs with the probe loss of block `name`."""
        probe, block = self.probes.probes[name], self.probes.blocks[name]
        self.refresh("fit")
        params, opt = self._opt([name])
        x, y, c = self.dd.x_fit, self.dd.y_fit, self.cfg
        perm, cperm = torch.randperm(len(y), generator=self.g), torch.randperm(len(self.x_clean), generator=self.g)
        for i in range(0, len(y), c.batch_size):
            if self.steps >= c.max_steps:
                break
            b = perm[i: i + c.batch_size]
            cb = cperm[torch.arange(i, i + len(b)) % len(cperm)]
            out = probe(pooled(_readout(self.model, block.readout, x[b].to(self.dev))))
            logits_c, h_c = _forward_with_readout(self.model, block.readout, self.x_clean[cb].to(self.dev))
            teacher = probe(pooled(h_c)).detach()
            loss = c.ce_weight * F.cross_entropy(out, y[b].to(self.dev)) + (1 - c.ce_weight) * kd_loss(out, teacher, c.kd_temperature)
            if c.clean_weight:
                loss = loss + c.clean_weight * F.cross_entropy(logits_c, self.y_clean[cb].to(self.dev))
            self._step(params, loss, opt)
        self._release(params)

    def output_pass(self) -> None:
        """One pass of masked CE on the final output over the augmented defective set (all blocks)."""
        self.refresh("fit")
        params, opt = self._opt(list(self.weights))
        x, y, c = self.dd.x_fit, self.dd.y_fit, self.cfg
        perm, cperm = torch.randperm(len(y), generator=self.g), torch.randperm(len(self.x_clean), generator=self.g)
        for i in range(0, len(y), c.batch_size):
            if self.steps >= c.max_steps:
                break
            b = perm[i: i + c.batch_size]
            xb = augment(x[b], self.g) if c.augment else x[b]
            loss = F.cross_entropy(self.model(xb.to(self.dev)), y[b].to(self.dev))
            if c.clean_weight:
                cb = cperm[torch.arange(i, i + len(b)) % len(cperm)]
                loss = loss + c.clean_weight * F.cross_entropy(self.model(self.x_clean[cb].to(self.dev)), self.y_clean[cb].to(self.dev))
            self._step(params, loss, opt)
        self._release(params)

    def best(self) -> dict:
        """The last state meeting the stopping rule, else the lowest violation within the accuracy
        tolerance, else the highest (accuracy − violation): all on validation data."""
        ok = [h for h in self.history if self.within_tolerance(h["val_accuracy"])]
        if ok:
            return min(ok, key=lambda h: (h["val_violation"] if not math.isnan(h["val_violation"]) else 0, -h["steps"]))
        return max(self.history, key=lambda h: h["val_accuracy"] - (h["val_violation"] or 0))


@REPAIRERS.register("masked_tune", "INNER: gradient-masked fine-tuning of the localised weights (probe loss + output CE)",
                    config=MaskedTuneConfig, needs=("argmax",), defaults=masked_tune_defaults)
def masked_tune(model: nn.Module, defect: Defect, sites: Sites | None, cfg: MaskedTuneConfig) -> Edit:
    work = copy.deepcopy(model).to(cfg.device).eval()      # eval throughout: BN statistics never move
    require(sites is not None and len(sites) > 0, "masked_tune needs sites to repair: use a localiser "
                                                  "(e.g. --locate probe)")
    masks = sites.masks(work, defect.repair.x_fit)
    probes = getattr(sites, "probes", None)
    if probes is None or not set(masks) <= set(probes.probes):
        blocks = find_blocks(work, defect.repair.x_fit.to(cfg.device), list(masks))
        probes = train_probes(work, defect, blocks, ProbeConfig(seed=cfg.seed, device=cfg.device))
    before = {n: get_layer(work, n).weight.detach().clone() for n in masks}
    tuner = _Tuner(work, defect, masks, probes, cfg)
    epoch2 = cfg.epoch2
    stopped = tuner.check("start")
    rounds = 0
    max_rounds = cfg.epochs
    while not stopped and rounds < max_rounds and tuner.steps < cfg.max_steps:
        rounds += 1
        for n in masks:
            tuner.probe_pass(n)
        stopped = tuner.check(f"round {rounds} probe")
        if stopped:
            break
        for _ in range(epoch2):
            tuner.output_pass()
        stopped = tuner.check(f"round {rounds} output")
    chosen = tuner.history[-1] if stopped else tuner.best()
    with torch.no_grad():
        for n, w in tuner.weights.items():
            w.copy_(chosen["state"][n])
    deltas = {}
    for n, w in tuner.weights.items():
        d = ((w.detach() - before[n]) * masks[n].to(w.device)).cpu()    # exactly zero off the mask
        if torch.any(d != 0):
            deltas[f"{n}.weight"] = d
    hist = [{k: v for k, v in h.items() if k != "state"} for h in tuner.history]
    why = {}
    if chosen is tuner.history[0]:             # the unrepaired state: say why, the user sees no change
        tuned = [h for h in tuner.history[1:]]
        closest = max(tuned, key=lambda h: (h["val_accuracy"], -h["val_violation"])) if tuned else None
        seen = (f"; the closest, {closest['stage']}, had {100 * closest['val_accuracy']:.2f} % at "
                f"{100 * closest['val_violation']:.1f} % violation" if closest else "")
        why["unchanged_because"] = ("the model already met the stopping rule on validation" if stopped else
                                    f"no tuned state kept validation accuracy within acc_tolerance={tuner.tol:g} of "
                                    f"{100 * tuner.acc0:.2f} %{seen}")
    return Edit(deltas, {"repairer": "masked_tune", "stopped": stopped, "rounds": rounds, "steps": tuner.steps,
                         "chosen": chosen["stage"], "tau": tuner.tau, "acc_tolerance": tuner.tol, "val_accuracy_before": tuner.acc0,
                         "masked_weights": {n: int(m.sum()) for n, m in masks.items()},
                         "defective_source": tuner.dd.source, "defective_samples": int(len(tuner.dd.y_fit)),
                         "history": hist, **why})


# The preset departs from INNER's released code where it measured better (dev models, seed 7, Fashion-MNIST):
# - a clean CE term and momentum: with the code's loss alone, validation accuracy fell ~9 pp before the backdoor went;
#   weight 2 rather than 1 kept 0.1–0.65 pt more test accuracy on all four dev cases (BadNets, Blended, WaNet,
#   FGSM) for 0.15–0.35 pt more ASR (robust accuracy +33.9 instead of +36.3); a term towards the unrepaired model's
#   logits (KD) instead of CE on the labels lost 1.15 pt on WaNet;
# - no augmentation of the defective set: the code's rotation ±30° / horizontal flip left BadNets at 4.5 % ASR and
#   Blended at 4.8 % after 20 rounds, at −1.1 pt; without it 0.2 % at −0.1 pt and 1.7 % at −0.2 pt;
# - τ = 0: all rounds run and the state with the lowest validation violation within the accuracy tolerance is kept
#   (INNER's τ of 15–25 % stops with a fifth of the backdoor left).
# `-R clean_weight=0 -R momentum=0 -R augment=true -R asr_threshold=null -R epochs=20` restores the code's behaviour.
METHODS.add("inner", MethodPreset("probe", "masked_tune", repair_options={"clean_weight": 2.0, "momentum": 0.9,
                                                                          "augment": False, "asr_threshold": 0.0},
                                  paper="Chen et al., ISSTA 2024 (INNER)"),
            "INNER: probes pick the layers, routing picks the fault weights, masked fine-tuning repairs them")
