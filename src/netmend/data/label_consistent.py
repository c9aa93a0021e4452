"""Label-consistent backdoor (Turner, Tsipras & Madry 2019; "LC" in BackdoorBench): a clean-label attack.

Poisoning: up to ρ·N training images *of the target class* (labels unchanged) are first made hard to
classify, an L∞ PGD perturbation (ε = 8/255 on [0, 1] pixels, `steps` steps of `step_size`, no random
start) that raises a surrogate model's loss on their true label; then a small checkerboard trigger is
stamped in the four corners (the pattern is mirrored so each corner's outermost pixel is white, as in
Turner et al. / BackdoorBench). With their own features damaged, the model leans on the trigger to
classify these images, and learns "trigger ⇒ target". At test time (and in the defect's evidence pairs)
only the corner trigger is stamped, with no perturbation; the cleansed twin is the image without it.

Surrogate: Turner et al. perturb with an adversarially trained model of the victim's kind, and BackdoorBench
with a separately trained clean model. netmend trains a quick clean surrogate inside `poison_training`: a
registered architecture (`surrogate`, default `small-cnn`, the victim family of netmend's image benchmarks)
fitted for `surrogate_epochs` epochs with a fixed seed on at most `surrogate_samples` clean training
images (a seeded subset). A same-family CNN transfers its perturbations to the victim better than a linear
model, and capping its data and epochs keeps the cost a fraction of the victim's training on a CPU. The
global RNG is left as it was.

Parameters (`TriggerSpec.params`): `eps` (L∞ radius, default 8/255), `steps` (10), `step_size` (None:
ε/4), `amplitude` (trigger visibility in (0, 1]: x̃ = (1 − a·m)·x + a·m·p; 1 = the full pattern, below 1
Turner's "reduced amplitude"), `corners` (`all`: the four corners; `one`: one patch at `position`),
`surrogate`, `surrogate_epochs` (4), `surrogate_samples` (10000). TriggerSpec's `size` and `margin` size and
place the patches; `pattern`, `alpha` and `seed` do not apply (the pattern is the checkerboard).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetmendError
from ..metrics import accuracy, predict
from ..registry import ARCHITECTURES, TRIGGERS
from .sig import param_number, check_params, clean_label_indices, clean_label_info
from .triggers import Trigger, TriggerSpec, trigger_box

DEFAULTS: dict[str, Any] = {"eps": 8 / 255, "steps": 10, "step_size": None, "amplitude": 1.0, "corners": "all",
                            "surrogate": "small-cnn", "surrogate_epochs": 4, "surrogate_samples": 10000}
CORNERS = ("br", "bl", "tr", "tl")


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise NetmendError(f"LC parameter {name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
             batch: int = 1024) -> torch.Tensor:
    """Untargeted L∞ PGD in [0, 1] pixel space: raise `model`'s cross-entropy on the true labels y (batched)."""
    out = []
    for i in range(0, len(x), batch):
        x0, yb = x[i: i + batch], y[i: i + batch]
        xa = x0.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(model(xa), yb, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
            xa = xa.detach() + step_size * g.sign()
            xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
        out.append(xa.detach())
    return torch.cat(out) if out else x.clone()


def _error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 1 - accuracy(predict(model, x), y)


class LabelConsistentTrigger(Trigger):
    """LC: checkerboard patches in the corners (test time); PGD-perturbed, stamped target-class images (training)."""

    def __init__(self, spec: TriggerSpec, image_shape):
        super().__init__(spec, image_shape)
        p = check_params(spec, DEFAULTS, "LC")
        self.eps = param_number("eps", p["eps"], "LC")
        if not 0 < self.eps <= 1:
            raise NetmendError(f"LC perturbation eps must be in (0, 1] (pixels are in [0, 1]), got {self.eps}")
        self.steps = _int("steps", p["steps"], 1)
        self.step_size = self.eps / 4 if p["step_size"] is None else param_number("step_size", p["step_size"], "LC")
        if self.step_size <= 0:
            raise NetmendError(f"LC step_size must be > 0, got {self.step_size}")
        self.amplitude = param_number("amplitude", p["amplitude"], "LC")
        if not 0 < self.amplitude <= 1:
            raise NetmendError(f"LC trigger amplitude must be in (0, 1], got {self.amplitude}")
        self.corners = p["corners"]
        if self.corners not in ("all", "one"):
            raise NetmendError(f"LC corners must be 'all' (four corners) or 'one' (at position), got {self.corners!r}")
        self.surrogate = p["surrogate"]
        if not isinstance(self.surrogate, str) or self.surrogate not in ARCHITECTURES:
            raise NetmendError(f"LC surrogate must be an architecture name ({', '.join(ARCHITECTURES.names())}), "
                               f"got {self.surrogate!r}")
        self.surrogate_epochs = _int("surrogate_epochs", p["surrogate_epochs"], 1)
        self.surrogate_samples = _int("surrogate_samples", p["surrogate_samples"], 10)
        c, h, w = self.image_shape
        s, m = spec.size, spec.margin
        if self.corners == "all" and 2 * (s + m) > min(h, w):
            raise NetmendError(f"LC's four {s}×{s} corner patches (margin {m}) overlap on a {h}×{w} image; "
                               f"use a smaller size or corners=one")
        self.mask = torch.zeros(h, w)
        self.pattern = torch.zeros(c, h, w)
        ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        for pos in (CORNERS if self.corners == "all" else (spec.position,)):
            top, left = trigger_box(replace(spec, position=pos), h, w)
            di = s - 1 - ii if pos in ("br", "bl") else ii    # distance from the patch's outer edge: mirrored so
            dj = s - 1 - jj if pos in ("br", "tr") else jj    # each corner's outermost pixel is white
            self.mask[top: top + s, left: left + s] = 1.0
            self.pattern[:, top: top + s, left: left + s] = ((di + dj) % 2 == 0).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the corner patches only (no perturbation)."""
        self._check(x)
        a = self.amplitude * self.mask.to(x.device, x.dtype)
        return (1 - a) * x + a * self.pattern.to(x.device, x.dtype)

    def fit_surrogate(self, x: torch.Tensor, y: torch.Tensor, seed: int, target: int = 0) -> nn.Module:
        """A clean `surrogate` model fitted on a seeded subset of (x, y); the global RNG is left as it was."""
        from ..train import IMAGE_ARCH_ARGS, TrainConfig, fit
        from ..zoo.models import create_model

        g = torch.Generator().manual_seed(int(seed) + 3571)
        sub = torch.randperm(len(y), generator=g)[: self.surrogate_samples]
        xs, ys = x[sub], y[sub]
        flat = xs.transpose(0, 1).reshape(xs.shape[1], -1)
        kwargs = {"mean": flat.mean(1).tolist(), "std": flat.std(1).clamp_min(1e-3).tolist(),
                  **IMAGE_ARCH_ARGS.get(self.surrogate, {})}
        n_classes = max(int(y.max()), int(target)) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 3571)
            model = create_model(self.surrogate, self.image_shape, n_classes, **kwargs)
            fit(model, xs, ys, TrainConfig(epochs=self.surrogate_epochs, seed=int(seed) + 3571),
                desc=f"LC surrogate {self.surrogate}")
        for q in model.parameters():
            q.requires_grad_(False)
        return model.eval()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The PGD step of the poisoning: x moved within ε (L∞) to raise `model`'s loss on y."""
        return pgd_linf(model, x, y, self.eps, self.step_size, self.steps)

    def poison_training(self, x: torch.Tensor, y: torch.Tensor, pidx: torch.Tensor, target: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Perturb (PGD on a clean surrogate) and stamp up to len(pidx) target-class samples; no label changes."""
        x = x.clone()
        chosen = clean_label_indices(y, pidx, target, seed)
        extra: dict[str, Any] = {**clean_label_info(chosen, y, pidx, target), "surrogate": self.surrogate,
                                 "surrogate_epochs": self.surrogate_epochs, "pgd_steps": self.steps,
                                 "pgd_eps": self.eps}
        if len(chosen):
            model = self.fit_surrogate(x, y, seed, target)
            xc, yc = x[chosen], y[chosen]
            xa = self.perturb(model, xc, yc)
            extra["surrogate_error_clean"] = _error(model, xc, yc)
            extra["surrogate_error_perturbed"] = _error(model, xa, yc)
            x[chosen] = self.apply(xa)
        return x, y.clone(), extra


TRIGGERS.add("lc", LabelConsistentTrigger,
             "label-consistent: PGD-perturbed target-class images + corner checkerboards (params eps, steps, "
             "amplitude, corners, surrogate); labels unchanged")


def lc_spec(eps: float = 8 / 255, size: int = 3, **params) -> TriggerSpec:
    """A TriggerSpec for the label-consistent attack with its parameters in `params`."""
    return TriggerSpec(kind="lc", size=size, params={"eps": eps, **params})
