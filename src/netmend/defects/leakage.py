"""Feature-leakage defect on BlockMNIST: the model's explanation spills onto the null block.

The null block carries the same pattern for every class, so a well-behaved model should not rest
its decision (nor its attribution) on it. Metric, defined here because the paper's is unknown:

    leakage = mean over evaluated test images i of  Σ_{p ∈ null block} |IG_p(x_i)| / Σ_p |IG_p(x_i)|

with IG = Captum `IntegratedGradients` of the true-class logit, all-zero (black) baseline,
`ig_steps` Gauss-Legendre steps, on the first `ig_samples` test images. It is a share in [0, 1]
(0 = no attribution on the null block). It is NOT on the scale of Yang et al.'s Table 5 (values
2.4–3.6 there); compare relative changes only.

A second number, `net_leakage`, from the same IG maps:

    net_leakage = mean_i |Σ_{p ∈ null block} IG_p(x_i)|  /  mean_i |Σ_p IG_p(x_i)|

By IG's completeness Σ_p IG_p(x) = f_y(x) − f_y(0), so this is how much of the true-class logit the null
block accounts for, signs kept. Why both: on the models here the null square's attributions are large but
of both signs (a seed-7 dev model: +7.1 and −6.1 logits on the null block, net +0.9 of a total 10.7), so
|IG| measures how sharply the logit reacts to single null pixels, the net share what the block adds up to.

Evidence pairs: x̃ = a repair-pool image as is (its null block carries the pattern the model
leaks on), x = its cleansed twin, the null block replaced by a constant `fill` (black) block;
the mask marks the null block. Which pool images: those whose null block costs the true class the
most probability, P(y | x) − P(y | x̃) (ranked on the repair pool at training time and recorded in
model.json as `pair_candidates`), so each pair shows the model leaning on the null block; without
that record, a seeded draw. (Ranking by the IG share itself was tried: on those images blanking the
null block mostly *lowers* P(y), the blank block being unseen in training, so the pairs' gap is < 0.)
With `both_layouts` (default) each evidence image also comes with its blocks swapped, and `pair_groups` splits
the pairs by null-block position: on the dev model (seed 7) a one-pair dynamic rectify took its own layout's
net leakage 19.8 → 0.9 % and the other layout's 16.6 → 25.1 %; fitted layout after layout, 18.2 → 7.0 % overall.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.blockmnist import BLOCK, BlockLayout, blank_null, make_blockmnist, null_block, swap_blocks
from ..data.datasets import ImageData, load_dataset, split_indices
from ..errors import NetmendError, require
from ..layout import fast_layout
from ..metrics import per_class_accuracy, predict
from ..registry import DATASETS, DEFECTS
from ..train import TrainConfig, default_epochs, train_backdoored
from .backdoor import make_repair_data
from .base import Defect, Pairs, eval_count


@dataclass
class LeakageOptions:
    pairs: int = 1
    repair_fraction: float = 0.05     # of the training-set size, from the held-out pool
    val_fraction: float = 0.2
    seed: int = 0
    eval_limit: int | None = None     # cap on test images for accuracy (None = all)
    ig_samples: int = 300             # test images the leakage metric explains (IG is the slow part)
    ig_steps: int = 16
    ig_batch: int = 2048              # Captum internal_batch_size
    fill: float = 0.0                 # value of the blanked null block in cleansed twins
    both_layouts: bool = True         # each evidence image also in the other layout (blocks swapped): the null block
                                      # is the same pattern at either position, and an edit fitted to one layout
                                      # does not carry over to the other (measured on a dev model, see above)


def null_attribution(model: nn.Module, x: torch.Tensor, y: torch.Tensor, digit_top: torch.Tensor, steps: int = 32,
                     batch: int = 2048, chunk: int = 128) -> dict[str, torch.Tensor]:
    """Per image, from one IG map (true-class logit, black baseline): the |IG| share on the null block
    (`abs_share`), the signed IG sum on the null block (`null_sum`) and over the whole image (`total_sum`)."""
    from captum.attr import IntegratedGradients

    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    ig = IntegratedGradients(model)
    _, null_mask = BlockLayout(digit_top).masks(x.shape[-1])
    out: dict[str, list[torch.Tensor]] = {"abs_share": [], "null_sum": [], "total_sum": []}
    with fast_layout(model, x[:2].to(dev), n=len(x) * steps):     # channels-last: ~25 % less time, same maps to ~1e-5
        for i in range(0, len(x), chunk):
            xb = x[i: i + chunk].to(dev)
            a = ig.attribute(xb, baselines=torch.zeros_like(xb), target=y[i: i + chunk].to(dev), n_steps=steps,
                             internal_batch_size=batch).detach().sum(1).cpu()          # N×H×W, signed
            m = null_mask[i: i + chunk]
            out["abs_share"].append((a.abs() * m).flatten(1).sum(1) / a.abs().flatten(1).sum(1).clamp_min(1e-12))
            out["null_sum"].append((a * m).flatten(1).sum(1))
            out["total_sum"].append(a.flatten(1).sum(1))
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def infer_digit_top(x: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Which half is the digit, read off the images: the half farther from the null pattern."""
    top, bottom = x[..., :BLOCK, :], x[..., BLOCK:, :]
    p = null.to(x)
    d_top = (top - p).abs().flatten(1).sum(1)
    d_bot = (bottom - p).abs().flatten(1).sum(1)
    return d_top >= d_bot


class LeakageDefect(Defect):
    kind = "leakage"

    def __init__(self, data: ImageData, splits: dict[str, list[int]], options: LeakageOptions | None = None,
                 candidates: list[int] | None = None):
        o = options or LeakageOptions()
        require("digit_top_test" in data.info, f"dataset {data.name} has no BlockMNIST layout (digit_top metadata)")
        require(o.pairs >= 0, f"--pairs must be ≥ 0, got {o.pairs}")
        require(o.ig_steps >= 2 and o.ig_samples >= 1, "ig_steps must be ≥ 2 and ig_samples ≥ 1")
        self.data, self.options = data, o
        self.null = null_block(data.info.get("null", "square"))
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        self.repair, rest = make_repair_data(data.x_train, data.y_train, splits["repair_pool"], len(data.y_train),
                                             o.repair_fraction, o.val_fraction, o.seed)
        self.pair_rule = "recorded null-block cost ranking" if candidates else "seeded draw"
        idx = _choose(rest, candidates, o.pairs, o.seed)
        require(len(idx) >= o.pairs, f"--pairs {o.pairs} is more than the {len(idx)} pool images left for pairs")
        top, bad, labels = data.info["digit_top_train"][idx], data.x_train[idx], data.y_train[idx]
        if o.both_layouts and len(idx):          # interleaved: image i, then image i with its blocks swapped
            bad = torch.stack([bad, swap_blocks(bad)], 1).flatten(0, 1)
            top, labels = torch.stack([top, ~top], 1).flatten(), labels.repeat_interleave(2)
            idx = [i for i in idx for _ in range(2)]
        masks = BlockLayout(top).masks(data.x_train.shape[-1])[1]
        self.pairs = Pairs(bad, blank_null(bad, top, o.fill), labels, masks, idx)
        n = eval_count(o.eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:n], data.y_test[:n]
        self.top_test = data.info["digit_top_test"][:n]

    def pair_groups(self) -> list[Pairs]:
        """Pairs by null-block position, the first pair's layout first: an edit fitted to one layout removes that
        layout's leakage and worsens the other's, so dynamic rectification fits them one after another."""
        if self.pairs is None or not len(self.pairs):
            return []
        null_top = self.pairs.masks[:, 0, 0] > 0.5
        first = null_top == null_top[0]
        return [g for g in (self.pairs.select(first), self.pairs.select(~first)) if len(g)]

    def _estimate_set(self, split: str = "fit") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The repair images of a split, in a seeded random order (so that any prefix is a random sample of the set:
        `estimate_terms`). The fit split, which the loop's estimate reads, keeps the layouts of the pairs in use;
        the validation split is the gate's, held apart from every choice the loop makes."""
        r = self.repair
        x, y = (r.x_fit, r.y_fit) if split == "fit" else (r.x_val, r.y_val)
        top = self.data.info["digit_top_train"][torch.tensor(r.indices[split], dtype=torch.long)]
        if split == "fit" and self.pairs is not None and len(self.pairs):
            layouts = (self.pairs.masks[:, 0, 0] > 0.5).unique()     # null block on top ⇔ digit below
            keep = ((~top)[:, None] == layouts[None]).any(1)
            x, y, top = x[keep], y[keep], top[keep]
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.options.seed))
        return x[order], y[order], top[order]

    def estimate_size(self) -> int:
        return len(self._estimate_set()[1])

    def estimate_terms(self, model: nn.Module, start: int, stop: int, split: str = "fit"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image of the estimate set's [start, stop): |signed IG sum on the null block| and |signed IG sum|."""
        x, y, top = (t[start:stop] for t in self._estimate_set(split))
        a = null_attribution(model, x, y, top, self.options.ig_steps, self.options.ig_batch)
        return a["null_sum"].abs(), a["total_sum"].abs()

    def net_leakage(self, model: nn.Module, split: str = "fit") -> float:
        """`net_leakage` (module docstring) on the repair images of a split (`_estimate_set`)."""
        num, den = self.estimate_terms(model, 0, len(self._estimate_set(split)[1]), split)
        return float(num.mean() / den.mean().clamp_min(1e-12))

    def repair_estimate(self, model: nn.Module) -> float:
        """`net_leakage` on the repair fit images in the layouts of the pairs in use: what rectification's loop
        lowers, since a pair's gap closes long before the leakage of other images does (dev models, seeds 9 and 10:
        net leakage −30 / −6 % driven by the pairs' gap, −72 / −67 % driven by this)."""
        return self.net_leakage(model, "fit")

    def gate_estimate(self, model: nn.Module) -> tuple[float, str]:
        """`net_leakage` on the validation images, which the loop's estimate (fit images) never reads: the gate
        judges a repair on images no choice of it was made on."""
        value = self.net_leakage(model, "val") if len(self.repair.y_val) else 0.0
        return value, "net leakage on the validation images"

    def cleanse(self, x: torch.Tensor) -> torch.Tensor:
        """Blank the null block of BlockMNIST images (layout read off the images)."""
        return blank_null(x, infer_digit_top(x, self.null), self.options.fill)

    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """How far the null block moves the true-class probability: |P(y|x) − P(y|cleansed x)|."""
        both = model(torch.cat([x, self.cleanse(x)]))
        p = F.softmax(both, 1).gather(1, torch.cat([y, y]).view(-1, 1)).squeeze(1)
        return (p[: len(x)] - p[len(x):]).abs()

    def leakages(self, model: nn.Module) -> dict[str, float]:
        """Both leakage numbers (module docstring) from one IG pass over the first `ig_samples` test images."""
        k = min(self.options.ig_samples, len(self.y_test))
        a = null_attribution(model, self.x_test[:k], self.y_test[:k], self.top_test[:k], self.options.ig_steps,
                             self.options.ig_batch)
        net = a["null_sum"].abs().mean() / a["total_sum"].abs().mean().clamp_min(1e-12)
        return {"leakage": float(a["abs_share"].mean()), "net_leakage": float(net)}

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        pred = predict(model, self.x_test)
        t0 = time.perf_counter()
        leak = self.leakages(model)
        return {
            "clean_accuracy": float((pred == self.y_test).float().mean()),
            **leak,
            "blank_null_accuracy": float((predict(model, blank_null(self.x_test, self.top_test, self.options.fill))
                                          == self.y_test).float().mean()),
            "per_class_accuracy": per_class_accuracy(pred, self.y_test, self.num_classes),
            "n_test": int(len(self.y_test)),
            "n_leakage": int(min(self.options.ig_samples, len(self.y_test))),
            "leakage_seconds": time.perf_counter() - t0,
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"dataset": self.data.name, "null": self.data.info.get("null"), "pair_rule": self.pair_rule,
                  "leakage_metric": "mean share of |IG| (true logit, black baseline) on the null block",
                  "net_leakage_metric": "mean |signed IG sum on the null block| / mean |signed IG sum|",
                  "options": asdict(self.options)})
        return d


def _choose(rest: list[int], candidates: list[int] | None, n: int, seed: int) -> list[int]:
    """Recorded candidates first (in their order, restricted to the unused pool), then a seeded draw."""
    free = set(rest)
    idx = [i for i in (candidates or []) if i in free][:n]
    if len(idx) < n:
        g = torch.Generator().manual_seed(int(seed) + 202)
        taken = set(idx)
        others = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist() if rest[i] not in taken]
        idx += others[: n - len(idx)]
    return idx


def blockmnist_data(info: dict, data_dir=None) -> ImageData:
    d = info.get("defect", {})
    base = load_dataset(d.get("base", "mnist-5k"), data_dir or info.get("data_dir"))
    return make_blockmnist(base, d.get("layout_seed", 0), d.get("null", "square"))


@DEFECTS.register("leakage", "feature leakage: attribution on BlockMNIST's non-discriminative null block",
                  config=LeakageOptions)
def leakage_from_info(info: dict, options: LeakageOptions, data_dir=None, data: ImageData | None = None) -> LeakageDefect:
    if info.get("dataset") != "blockmnist":
        raise NetmendError(f"the leakage defect needs a BlockMNIST model, this one was trained on {info.get('dataset')!r}")
    data = data or blockmnist_data(info, data_dir)
    splits = split_indices(len(data.y_train), info["split_seed"], info.get("pool_fraction", 0.1))
    return LeakageDefect(data, splits, options, info["defect"].get("pair_candidates"))


def train_leakage(arch: str = "small-cnn", cfg: TrainConfig | None = None, device: str = "cpu", data_dir=None,
                  layout_seed: int = 0, null: str = "square", base: str = "mnist-5k", split_seed: int | None = None,
                  pool_fraction: float = 0.1, rank_pairs: int = 100) -> tuple[nn.Module, dict[str, Any]]:
    """Train on BlockMNIST (nothing poisoned: the leakage comes from training itself) and record the
    repair-pool images whose null block costs the true class most, as pair candidates."""
    data = make_blockmnist(load_dataset(base, data_dir), layout_seed, null)
    cfg = cfg or TrainConfig(epochs=default_epochs(arch, base), seed=0)
    model, info = train_backdoored("blockmnist", arch, None, cfg=cfg, device=device, data_dir=data_dir,
                                   split_seed=split_seed, pool_fraction=pool_fraction, data=data)
    splits = split_indices(len(data.y_train), info["split_seed"], pool_fraction)
    pool = torch.tensor(splits["repair_pool"])
    order = null_cost_ranking(model, data.x_train[pool], data.y_train[pool], data.info["digit_top_train"][pool])
    info["defect"] = {"kind": "leakage", "base": base, "layout_seed": int(layout_seed), "null": null,
                      "pair_candidates": pool[order[:rank_pairs]].tolist(),
                      "pair_rule": "repair-pool images by P(y | null blanked) − P(y | image), highest first"}
    return model, info


def train_blockmnist(dataset: str = "blockmnist", arch: str = "small-cnn", seed: int = 0, epochs: int | None = None,
                     device: str = "cpu", data_dir=None) -> tuple[nn.Module, dict[str, Any]]:
    """`netmend train --dataset blockmnist`: a leakage model with its recorded pair candidates."""
    return train_leakage(arch, TrainConfig(epochs=epochs or default_epochs(arch, "mnist-5k"), seed=seed), device,
                         data_dir)


# BlockMNIST models are trained by the leakage defect, which records the evidence candidates the CLI's repair reads.
DATASETS.entry("blockmnist").extra["trainer"] = train_blockmnist


def null_cost_ranking(model: nn.Module, x: torch.Tensor, y: torch.Tensor, digit_top: torch.Tensor,
                      fill: float = 0.0) -> torch.Tensor:
    """Positions of x ordered by how much probability of y the null block costs (largest first)."""
    from ..metrics import logits

    p_bad = F.softmax(logits(model, x), 1).gather(1, y.view(-1, 1)).squeeze(1)
    p_cln = F.softmax(logits(model, blank_null(x, digit_top, fill)), 1).gather(1, y.view(-1, 1)).squeeze(1)
    return torch.argsort(p_cln - p_bad, descending=True)
