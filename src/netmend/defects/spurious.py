"""Spurious-correlation defect: a pattern stamped on part of ONE class's training images, labels kept.

The model learns "pattern ⇒ class c" next to the real features of c (Yang et al.; docs/defects.md).
Metrics on the untouched test set, as the paper's Table 4:

- `overall_accuracy` (= `clean_accuracy`): all test images, no pattern;
- `clean`: accuracy on class c's test images without the pattern;
- `spur`: acc(class c's test images WITH the pattern) − `clean` — the bias, lower is better;
- `pattern_pull_rate`: share of the other classes' stamped test images predicted as c.

Evidence pairs x̃ → x: x a repair-pool image of ANOTHER class, x̃ = x with the pattern. Which
images: those whose stamped version the trained model pulls into c (ranked by the rise of
P(c | x̃) − P(c | x) on the repair pool at training time, recorded in model.json as
`pair_candidates`), so that each pair shows the defect; without that record, a seeded draw.
`pair_classes="spurious"` takes class-c images instead (x̃ then is already classified right).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import ImageData, load_dataset, split_indices
from ..data.triggers import Trigger, TriggerSpec, trigger_box, build_trigger, stamp_batched
from ..errors import require
from ..metrics import logits, per_class_accuracy, predict
from ..registry import DEFECTS
from ..train import TrainConfig, default_epochs, fit_image_model, model_info
from .backdoor import make_repair_data
from .base import Defect, Objective, Pairs, eval_count


@dataclass
class SpuriousOptions:
    pairs: int = 1
    repair_fraction: float = 0.05
    val_fraction: float = 0.2
    seed: int = 0
    eval_limit: int | None = None
    pair_classes: str = "others"      # others (pulled images of other classes first) | spurious | all


# ----------------------------------------------------------------------------- the pattern

def stamp_class(x: torch.Tensor, y: torch.Tensor, trigger: Trigger, cls: int, fraction: float,
                seed: int) -> tuple[torch.Tensor, list[int]]:
    """Stamp a seeded `fraction` of class `cls`'s samples; labels are never touched (none returned)."""
    require(0 <= fraction <= 1, f"spurious fraction must be in [0, 1], got {fraction}")
    members = torch.nonzero(y == cls).flatten()
    g = torch.Generator().manual_seed(int(seed) + 4241)
    k = int(round(fraction * len(members)))
    chosen = members[torch.randperm(len(members), generator=g)[:k]].sort().values
    out = x.clone()
    if k:
        out[chosen] = stamp_batched(trigger, x[chosen])
    return out, chosen.tolist()


class MovedPattern(Trigger):
    """The same patch content at another position and/or visibility α (trigger-generalisation check):
    x' = (1 − α m') ⊙ x + α m' ⊙ p', with the box of the base pattern moved to `position`."""

    def __init__(self, base: Trigger, position: str | None = None, alpha: float | None = None):
        super().__init__(base.spec, base.image_shape)
        m = base.mask
        rows, cols = torch.nonzero(m > 0, as_tuple=True)
        require(len(rows) > 0, "the pattern has an empty mask")
        top0, left0 = int(rows.min()), int(cols.min())
        h, w = int(rows.max()) - top0 + 1, int(cols.max()) - left0 + 1
        require(h < m.shape[0] or w < m.shape[1] or position in (None, base.spec.position),
                "a full-image pattern cannot be moved")
        spec = TriggerSpec(**{**base.spec.to_json(), "size": max(h, w)})
        if position is not None:
            spec.position = position
        top, left = trigger_box(spec, *m.shape) if position is not None else (top0, left0)
        self.mask = torch.zeros_like(m)
        self.mask[top: top + h, left: left + w] = m[top0: top0 + h, left0: left0 + w]
        self.pattern = torch.zeros_like(base.pattern)
        self.pattern[:, top: top + h, left: left + w] = base.pattern[:, top0: top0 + h, left0: left0 + w]
        default_alpha = base.spec.alpha if base.spec.kind == "blended" else 1.0
        self.alpha = float(default_alpha if alpha is None else alpha)
        self.position = position or base.spec.position

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a = self.alpha * self.mask.to(x.device, x.dtype)
        return (1 - a) * x + a * self.pattern.to(x.device, x.dtype)


# ----------------------------------------------------------------------------- the defect

class SpuriousDefect(Defect):
    kind = "spurious"
    transplantable = True
    stamp_goal = "invariant"   # the pattern must count neither for nor against the class

    @property
    def variant(self) -> str:
        return self.trigger.spec.kind

    def __init__(self, data: ImageData, splits: dict[str, list[int]], trigger: Trigger, cls: int,
                 options: SpuriousOptions | None = None, candidates: list[int] | None = None):
        o = options or SpuriousOptions()
        require(0 <= cls < data.num_classes, f"spurious class {cls} outside 0..{data.num_classes - 1}")
        require(o.pairs >= 0, f"--pairs must be ≥ 0, got {o.pairs}")
        require(o.pair_classes in ("others", "spurious", "all"),
                f"pair_classes must be others, spurious or all, got {o.pair_classes!r}")
        self.data, self.trigger, self.cls, self.options = data, trigger, int(cls), o
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        self.repair, rest = make_repair_data(data.x_train, data.y_train, splits["repair_pool"], len(data.y_train),
                                             o.repair_fraction, o.val_fraction, o.seed)
        idx, self.pair_rule = self._choose(rest, candidates)
        require(len(idx) >= o.pairs, f"--pairs {o.pairs} is more than the {len(idx)} pool images available for pairs")
        clean = data.x_train[idx]
        masks = trigger.mask.expand(len(idx), *trigger.mask.shape).clone()
        self.pairs = Pairs(trigger.apply(clean), clean, data.y_train[idx], masks, idx)
        n = eval_count(o.eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:n], data.y_test[:n]
        self._stamped_test = stamp_batched(trigger, self.x_test)

    def _choose(self, rest: list[int], candidates: list[int] | None) -> tuple[list[int], str]:
        o, y = self.options, self.data.y_train
        ok = {"others": lambda c: c != self.cls, "spurious": lambda c: c == self.cls, "all": lambda c: True}[o.pair_classes]
        pool = [i for i in rest if ok(int(y[i]))]
        free = set(pool)
        idx = [i for i in (candidates or []) if i in free][: o.pairs] if o.pair_classes == "others" else []
        rule = "recorded pull ranking" if idx else "seeded draw"
        if len(idx) < o.pairs:
            g = torch.Generator().manual_seed(int(o.seed) + 303)
            taken = set(idx)
            idx += [pool[i] for i in torch.randperm(len(pool), generator=g).tolist() if pool[i] not in taken][: o.pairs - len(idx)]
        return idx, rule

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self.trigger.apply(x)

    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Probability the pattern-carrying inputs get on the spurious class (0 for its own members)."""
        p = F.softmax(model(x), dim=1)[:, self.cls]
        return torch.where(y == self.cls, torch.zeros_like(p), p)

    def objective(self, model: nn.Module) -> Objective:
        """Stamped fit samples of other classes keep their label; clean fit samples keep theirs."""
        keep = self.repair.y_fit != self.cls
        x_bad, y_bad = self.stamp(self.repair.x_fit[keep]), self.repair.y_fit[keep]
        return Objective(x_bad, lambda z: z.argmax(-1) != y_bad.to(z.device), self.repair.x_fit, self.repair.y_fit)

    def gate_check(self, model: nn.Module) -> dict[str, Any]:
        """Validation accuracy and the pull of stamped validation samples of other classes into the class."""
        return {**super().gate_check(model), "defect": self.stamped_pull(model, self.cls),
                "defect_name": "pattern pull on stamped validation samples"}

    def pattern_metrics(self, model: nn.Module, trigger: Trigger | None = None,
                        pred_clean: torch.Tensor | None = None) -> dict[str, float]:
        """clean / with_pattern / spur / pattern_pull_rate for a pattern (default: the training one)."""
        pred = predict(model, self.x_test) if pred_clean is None else pred_clean
        pred_s = predict(model, self._stamped_test if trigger is None else stamp_batched(trigger, self.x_test))
        own = self.y_test == self.cls
        clean = float((pred[own] == self.cls).float().mean())
        with_p = float((pred_s[own] == self.cls).float().mean())
        return {"clean": clean, "with_pattern": with_p, "spur": with_p - clean,
                "pattern_pull_rate": float((pred_s[~own] == self.cls).float().mean())}

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        pred = predict(model, self.x_test)
        acc = float((pred == self.y_test).float().mean())
        return {"clean_accuracy": acc, "overall_accuracy": acc, **self.pattern_metrics(model, None, pred),
                "per_class_accuracy": per_class_accuracy(pred, self.y_test, self.num_classes),
                "n_test": int(len(self.y_test)), "n_spurious_class": int((self.y_test == self.cls).sum())}

    def generalisation(self, model: nn.Module, alphas=(0.3, 0.5, 0.7, 1.0),
                       positions=("br", "tl", "center", "bl")) -> dict[str, dict[str, float]]:
        """Pattern metrics with the same patch content at other visibilities and positions."""
        pred = predict(model, self.x_test)
        out = {f"alpha={a}": self.pattern_metrics(model, MovedPattern(self.trigger, None, a), pred) for a in alphas}
        out.update({f"pos={p}": self.pattern_metrics(model, MovedPattern(self.trigger, p, None), pred) for p in positions})
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"dataset": self.data.name, "spurious_class": self.cls, "pattern": self.trigger.spec.to_json(),
                  "pair_rule": self.pair_rule, "options": asdict(self.options), "n_test": int(len(self.y_test))})
        return d


@DEFECTS.register("spurious", "spurious correlation: a pattern on part of one class's training images (labels kept)",
                  config=SpuriousOptions)
def spurious_from_info(info: dict, options: SpuriousOptions, data_dir=None, data: ImageData | None = None) -> SpuriousDefect:
    d = info["defect"]
    data = data or load_dataset(info["dataset"], data_dir or info.get("data_dir"))
    splits = split_indices(len(data.y_train), info["split_seed"], info.get("pool_fraction", 0.1))
    trigger = build_trigger(TriggerSpec.from_json(d["pattern"]), data.in_shape)
    return SpuriousDefect(data, splits, trigger, d["class"], options, d.get("pair_candidates"))


# ----------------------------------------------------------------------------- training a biased model

def pull_ranking(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, cls: int,
                 indices: list[int]) -> tuple[list[int], int]:
    """Other-class samples ranked by how much the pattern raises P(cls) (pulled ones first); + #pulled."""
    keep = [j for j, i in enumerate(indices) if int(y[j]) != cls]
    xs = x[keep]
    p0 = F.softmax(logits(model, xs), 1)[:, cls]
    z1 = logits(model, stamp_batched(trigger, xs))
    p1 = F.softmax(z1, 1)[:, cls]
    pulled = z1.argmax(1) == cls
    score = (p1 - p0) + pulled.float()          # pulled ones first, then by the rise of P(cls)
    order = torch.argsort(score, descending=True)
    return [indices[keep[j]] for j in order.tolist()], int(pulled.sum())


def train_spurious(dataset: str, arch: str, pattern: TriggerSpec, spurious_class: int = 0, fraction: float = 0.5,
                   cfg: TrainConfig | None = None, device: str = "cpu", data_dir=None, split_seed: int | None = None,
                   pool_fraction: float = 0.1, data: ImageData | None = None,
                   rank_pairs: int = 200) -> tuple[nn.Module, dict[str, Any]]:
    """Train `arch` with `pattern` on a `fraction` of class `spurious_class`'s training images (labels
    unchanged); return (model, model.json) in `train_backdoored`'s layout."""
    cfg = cfg or TrainConfig(epochs=default_epochs(arch, dataset))
    data = data or load_dataset(dataset, data_dir)
    require(0 <= spurious_class < data.num_classes, f"spurious class {spurious_class} outside 0..{data.num_classes - 1}")
    split_seed = cfg.seed if split_seed is None else split_seed
    splits = split_indices(len(data.y_train), split_seed, pool_fraction)
    tr = torch.tensor(splits["train"])
    y = data.y_train[tr]
    trig = build_trigger(pattern, data.in_shape)
    x, stamped = stamp_class(data.x_train[tr], y, trig, spurious_class, fraction, cfg.seed)
    model, arch_args, seconds = fit_image_model(data, arch, x, y, cfg, device, f"train {arch} on {dataset} (spurious)")
    pool = splits["repair_pool"]
    ranking, n_pulled = pull_ranking(model, data.x_train[pool], data.y_train[pool], trig, spurious_class, pool)
    probe = SpuriousDefect(data, splits, trig, spurious_class, SpuriousOptions(pairs=0))
    m = probe.metrics(model)
    defect = {"kind": "spurious", "pattern": pattern.to_json(), "class": int(spurious_class),
              "fraction": float(fraction), "stamped": len(stamped), "pair_candidates": ranking[:rank_pairs],
              "pool_pulled": n_pulled,
              "pair_rule": "other-class repair-pool images the pattern pulls into the class first, then by rise of P(class)"}
    info = model_info(dataset, data, arch, arch_args, data_dir, split_seed, pool_fraction, len(tr), defect, cfg, seconds,
                      device, {k: v for k, v in m.items() if k != "per_class_accuracy"})
    return model, info
