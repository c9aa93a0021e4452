"""Wrong-predictions defect (INNER's `wp` scenario; docs/defects.md): clean inputs the model gets wrong.

Evidence: held-out repair-pool samples the original model misclassifies, with their right labels.
Models with systematic mistakes to repair: `train_mislabelled` (part of one class labelled as another in training,
as annotators confuse shirts with T-shirts); the repair pool and the test set keep their right labels.
The test-side yardstick is fixed when the defect is prepared with the original model: its
misclassified test samples of the evidence classes. `heldout_fixed` is the share of those the
measured model now gets right — generalisation, not memorisation of the evidence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import ImageData, load_dataset, split_indices
from ..errors import NetmendError, require
from ..metrics import class_fairness_gap, per_class_accuracy, predict
from ..registry import DEFECTS
from ..train import TrainConfig, default_epochs, fit_image_model, model_info
from .backdoor import make_repair_data
from .base import Defect, Objective, Pairs, eval_count


@dataclass
class WrongPredictionsOptions:
    pairs: int = 1000                 # at most this many misclassified samples as evidence
    repair_fraction: float = 0.05
    val_fraction: float = 0.5         # judged by accuracy itself: 1 500 validation images (of Fashion-MNIST's
                                      # 3 000) see a 1-point loss that 600 miss
    seed: int = 0
    classes: str | None = None        # restrict evidence to these classes, "3,6" (default: all)
    eval_limit: int | None = None


def _classes(spec: str | list | None, k: int) -> list[int] | None:
    if spec is None or spec == "":
        return None
    try:
        out = [int(c) for c in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise NetmendError(f"classes must be comma-separated class indices, got {spec!r}") from None
    bad = [c for c in out if not 0 <= c < k]
    require(not bad, f"classes {bad} outside 0..{k - 1}")
    return out


class WrongPredictionsDefect(Defect):
    kind = "wrong-predictions"

    def __init__(self, data: ImageData, splits: dict[str, list[int]], options: WrongPredictionsOptions | None = None,
                 model: nn.Module | None = None):
        o = options or WrongPredictionsOptions()
        require(o.pairs >= 1, f"--pairs must be ≥ 1, got {o.pairs}")
        self.data, self.options = data, o
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        self.classes = _classes(o.classes, data.num_classes)
        self.repair, self._rest = make_repair_data(data.x_train, data.y_train, splits["repair_pool"], len(data.y_train),
                                                   o.repair_fraction, o.val_fraction, o.seed)
        n = eval_count(o.eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:n], data.y_test[:n]
        self._pairs: Pairs | None = None
        self.evidence_classes: list[int] = []      # bound by prepare: the classes of the evidence
        self.heldout: torch.Tensor | None = None
        if model is not None:
            self.prepare(model)

    @property
    def pairs(self) -> Pairs:
        if self._pairs is None:
            raise NetmendError("wrong-predictions defect has no evidence yet: call defect.prepare(model) first")
        return self._pairs

    def prepare(self, model: nn.Module) -> None:
        """Find the original model's mistakes: evidence in the held-out pool, the yardstick in the test set."""
        if self._pairs is not None:
            return
        idx = torch.tensor(self._rest, dtype=torch.long)
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        wrong = predict(model, x) != y
        if self.classes is not None:
            wrong &= torch.isin(y, torch.tensor(self.classes))
        if not wrong.any():
            raise NetmendError("the model misclassifies no held-out repair sample (of the chosen classes): nothing to repair")
        sel = wrong.nonzero().flatten()[: self.options.pairs]
        xs = x[sel]
        self._pairs = Pairs(xs, xs.clone(), y[sel], None, idx[sel].tolist())
        classes = torch.unique(y[sel])
        miss = (predict(model, self.x_test) != self.y_test) & torch.isin(self.y_test, classes)
        self.heldout = miss.nonzero().flatten()
        self.evidence_classes = classes.tolist()

    def gate_check(self, model: nn.Module) -> dict[str, Any]:
        """Validation accuracy, and the error on validation samples of the evidence classes."""
        out = super().gate_check(model)
        classes = torch.tensor(self.evidence_classes or list(range(self.num_classes)))
        keep = torch.isin(self.repair.y_val, classes)
        if keep.any():
            wrong = predict(model, self.repair.x_val[keep]) != self.repair.y_val[keep]
            out.update(defect=float(wrong.float().mean()), defect_name="error on validation samples of the evidence classes")
        return out

    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """1 − probability of the right label (differentiable)."""
        return 1 - F.softmax(model(x), dim=1).gather(1, y.view(-1, 1)).squeeze(1)

    def objective(self, model: nn.Module) -> Objective:
        x_bad, y_bad = self.pairs.corrupted, self.pairs.labels

        def violated(logits: torch.Tensor) -> torch.Tensor:
            return logits.argmax(-1) != y_bad.to(logits.device)

        return Objective(x_bad, violated, self.repair.x_fit, self.repair.y_fit)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        self.prepare(model)            # the first model measured is the reference (api.repair prepares first)
        pred = predict(model, self.x_test)
        pca = per_class_accuracy(pred, self.y_test, self.num_classes)
        ev = predict(model, self.pairs.corrupted) == self.pairs.labels
        h = self.heldout
        fixed = float((pred[h] == self.y_test[h]).float().mean()) if len(h) else float("nan")
        return {"clean_accuracy": float((pred == self.y_test).float().mean()), "evidence_fixed": float(ev.float().mean()),
                "heldout_fixed": fixed, "class_fairness_gap": class_fairness_gap(pca), "per_class_accuracy": pca,
                "n_test": int(len(self.y_test)), "n_heldout": int(len(h)), "n_evidence": int(len(self.pairs))}

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "repair_fit": len(self.repair.y_fit), "repair_val": len(self.repair.y_val),
             "repair_indices": self.repair.indices, "dataset": self.data.name, "n_test": int(len(self.y_test))}
        if self._pairs is not None:
            d.update({"pairs": len(self._pairs), "pair_indices": self._pairs.indices,
                      "evidence_classes": self.evidence_classes, "heldout_test_indices": self.heldout.tolist()})
        return d

    def samples_used(self, uses_pairs: bool = True) -> int:
        return len(self.repair) + (len(self._pairs) if (uses_pairs and self._pairs is not None) else 0)


@DEFECTS.register("wrong-predictions", "clean inputs the model misclassifies (repair target: their true labels)",
                  config=WrongPredictionsOptions, needs_model=True)
def wrong_predictions_from_info(info: dict, options: WrongPredictionsOptions, data_dir=None,
                                data: ImageData | None = None, model: nn.Module | None = None) -> WrongPredictionsDefect:
    data = data or load_dataset(info["dataset"], data_dir or info.get("data_dir"))
    splits = split_indices(len(data.y_train), info["split_seed"], info.get("pool_fraction", 0.1))
    return WrongPredictionsDefect(data, splits, options, model)


# ----------------------------------------------------------------------------- training a mislabelled model

def mislabel(y: torch.Tensor, source: int, as_class: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of labels `y` with round(fraction · #source) of the `source` labels, picked by `seed`, set to
    `as_class`; and the positions changed."""
    require(0 < fraction <= 1, f"mislabel fraction must be in (0, 1], got {fraction}")
    require(source != as_class, f"mislabelling class {source} as itself changes nothing")
    src = (y == source).nonzero().flatten()
    require(len(src) > 0, f"no training sample of class {source} to mislabel")
    g = torch.Generator().manual_seed(int(seed) + 303)
    flip = src[torch.randperm(len(src), generator=g)[: int(round(fraction * len(src)))]]
    out = y.clone()
    out[flip] = as_class
    return out, flip


def train_mislabelled(dataset: str, arch: str, source: int, as_class: int, fraction: float = 0.4,
                      cfg: TrainConfig | None = None, device: str = "cpu", data_dir=None, split_seed: int | None = None,
                      pool_fraction: float = 0.1, data: ImageData | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train `arch` with `fraction` of class `source`'s training labels set to `as_class` (label noise with a
    direction: the model learns a systematic mistake); return (model, model.json) recording a wrong-predictions
    defect. Only the training split is mislabelled: the repair pool and the test set keep the right labels."""
    cfg = cfg or TrainConfig(epochs=default_epochs(arch, dataset))
    data = data or load_dataset(dataset, data_dir)
    k = data.num_classes
    require(0 <= source < k and 0 <= as_class < k, f"mislabelled classes {source}, {as_class} must be in 0..{k - 1}")
    split_seed = cfg.seed if split_seed is None else split_seed
    splits = split_indices(len(data.y_train), split_seed, pool_fraction)
    tr = torch.tensor(splits["train"])
    y, flipped = mislabel(data.y_train[tr], source, as_class, fraction, cfg.seed)
    model, arch_args, seconds = fit_image_model(data, arch, data.x_train[tr], y, cfg, device,
                                                f"train {arch} on {dataset} (class {source} partly labelled {as_class})")
    pred = predict(model, data.x_test)
    src = data.y_test == source
    metrics = {"clean_accuracy": float((pred == data.y_test).float().mean()),
               "source_accuracy": float((pred[src] == source).float().mean()),
               "source_as_class": float((pred[src] == as_class).float().mean())}
    defect = {"kind": "wrong-predictions", "mislabelled": {"class": int(source), "as": int(as_class),
                                                           "fraction": float(fraction), "flipped": int(len(flipped))}}
    info = model_info(dataset, data, arch, arch_args, data_dir, split_seed, pool_fraction, len(tr), defect, cfg, seconds,
                      device, metrics)
    return model, info
