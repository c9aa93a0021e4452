"""Fairness defect (individual discrimination) and the tabular trainer (docs/defects.md).

An input x is *discriminatory* when changing only its protected attribute(s) to another value of
their integer domain (the Cartesian product for several) changes the predicted label. The check is
one batched forward pass over the (sample × protected-value combination) tensor; the combinations
include x's own values, so "not all predictions equal" is exactly "some flip changes the label".

Evidence (what CARE calls the DI set) depends on the model, so it is found when the defect is bound
to the model to repair (`bind(model)`, done by the first `objective(model)`): discriminatory rows of
the repair pool, topped up by a seeded random search that perturbs non-protected features.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tabular import TABULAR, TabularData, load_tabular, split_tabular
from ..errors import NetmendError, require
from ..metrics import predict
from ..registry import DATASETS, DEFECTS
from .backdoor import make_repair_data
from .base import Defect, Objective, Pairs, eval_count


# ----------------------------------------------------------------------------- batched discrimination check

def protected_grid(lo: Sequence[int], hi: Sequence[int], idx: Sequence[int]) -> torch.Tensor:
    """All value combinations of the protected features, (M, P) floats (Cartesian product)."""
    axes = [torch.arange(int(lo[j]), int(hi[j]) + 1, dtype=torch.float32) for j in idx]
    return torch.cartesian_prod(*axes).reshape(-1, len(idx))


def flip_copies(x: torch.Tensor, idx: Sequence[int], grid: torch.Tensor) -> torch.Tensor:
    """(N, F) -> (N, M, F): x with its protected features set to every combination of the grid."""
    out = x.unsqueeze(1).repeat(1, len(grid), 1)
    out[:, :, list(idx)] = grid.to(x.device, x.dtype).unsqueeze(0)
    return out


@torch.no_grad()
def discriminatory(model: nn.Module, x: torch.Tensor, idx: Sequence[int], grid: torch.Tensor,
                   max_rows: int = 1 << 21) -> torch.Tensor:
    """Bool (N,): does some protected-value combination change x's predicted label? One forward pass
    over N·M rows (chunked only when N·M exceeds max_rows, to bound memory)."""
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    m = len(grid)
    step = max(1, max_rows // m)
    out = []
    for i in range(0, len(x), step):
        c = flip_copies(x[i: i + step].to(dev), idx, grid)
        pred = model(c.reshape(-1, c.shape[-1])).argmax(-1).view(len(c), m)
        out.append((pred != pred[:, :1]).any(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def group_ids(x: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """One integer group id per row from its protected values (intersectional groups, as Fairlearn)."""
    return torch.unique(x[:, list(idx)], dim=0, return_inverse=True)[1]


def demographic_parity_difference(pred: torch.Tensor, groups: torch.Tensor) -> float:
    """max − min over groups of the selection rate P(ŷ = 1 | group) (Fairlearn's definition)."""
    rates = [float((pred[groups == g] == 1).float().mean()) for g in groups.unique()]
    return max(rates) - min(rates) if rates else float("nan")


def equalized_odds_difference(pred: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> float:
    """max(TPR gap, FPR gap) over groups (Fairlearn's definition); groups lacking a label are skipped."""
    gaps = []
    for label in (0, 1):
        rates = [float((pred[(groups == g) & (y == label)] == 1).float().mean())
                 for g in groups.unique() if ((groups == g) & (y == label)).any()]
        if rates:
            gaps.append(max(rates) - min(rates))
    return max(gaps) if gaps else float("nan")


# ----------------------------------------------------------------------------- the defect

@dataclass
class FairnessOptions:
    """Repair data and evidence sizes; `protected` overrides the attributes the model folder records."""

    pairs: int = 200                  # discriminatory instances kept as evidence (CARE's DI set)
    repair_fraction: float = 0.1      # of the training-split size, drawn from the held-out pool
    val_fraction: float = 0.2
    seed: int = 0
    protected: str | None = None      # one name or a comma list; None = the model folder's
    search_budget: int = 20000        # random candidates tried when the pool holds too few instances
    uniform_samples: int = 10000
    uniform_seed: int = 1234
    eval_limit: int | None = None
    # What the PSO objective counts (a deviation from CARE, docs/methods/care.md; measured in benchmarks/care.py):
    #   "care": the E evidence instances only (CARE's DI set; every one discriminatory by construction) —
    #           fits those rows and barely moves the test-split rate (15.9% mean reduction, seed 0);
    #   "pool": the evidence instances PLUS every repair-pool row outside the validation part (the natural
    #           population, ~10% discriminatory), so new discrimination on clean rows is also counted.
    objective: str = "pool"


class FairnessDefect(Defect):
    kind = "fairness"

    def __init__(self, data: TabularData, splits: dict[str, list[int]], protected: str | Sequence[str],
                 options: FairnessOptions | None = None):
        o = options or FairnessOptions()
        require(o.pairs >= 0, f"--pairs must be ≥ 0, got {o.pairs}")
        require(o.uniform_samples >= 1, f"uniform_samples must be ≥ 1, got {o.uniform_samples}")
        require(o.objective in ("care", "pool"), f"fairness objective must be care or pool, got {o.objective!r}")
        self.data, self.options, self.splits = data, o, splits
        self.attributes = data.protected_indices(protected)           # name -> feature index
        self.idx = list(self.attributes.values())
        self.grid = protected_grid(data.lo, data.hi, self.idx)
        self.num_classes, self.in_shape = data.num_classes, data.in_shape
        self.repair, rest = make_repair_data(data.x, data.y, splits["repair_pool"], len(splits["train"]),
                                             o.repair_fraction, o.val_fraction, o.seed)
        self._pool = sorted(self.repair.indices["fit"] + self.repair.indices["val"] + rest)
        te = torch.tensor(splits["test"][: eval_count(o.eval_limit, len(splits["test"]))])
        self.x_test, self.y_test = data.x[te], data.y[te]
        self.x_uniform = data.uniform(o.uniform_samples, o.uniform_seed)
        self.pairs: Pairs | None = None
        self.evidence_info: dict[str, Any] = {}

    # -- evidence ---------------------------------------------------------------------------------
    def flip(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N, M, F) copies with every protected-value combination (M = len(self.grid))."""
        return flip_copies(x, self.idx, self.grid)

    def prepare(self, model: nn.Module) -> None:
        self.bind(model)

    def bind(self, model: nn.Module) -> "FairnessDefect":
        """Find the evidence for this model (once): discriminatory pool rows, then a seeded search."""
        if self.pairs is not None:
            return self
        t0 = time.perf_counter()
        o, d = self.options, self.data
        pool = torch.tensor(self._pool)
        is_di = discriminatory(model, d.x[pool], self.idx, self.grid)
        found_rows = pool[is_di][: o.pairs]
        xs, ys, rows = [d.x[found_rows]], [d.y[found_rows]], found_rows.tolist()
        n_found, generated, tried = len(rows), 0, 0
        g = torch.Generator().manual_seed(int(o.seed) + 7)
        free = torch.tensor([j for j in range(d.x.shape[1]) if j not in self.idx])
        lo, hi = torch.tensor(d.lo, dtype=torch.float32), torch.tensor(d.hi, dtype=torch.float32)
        seen = {tuple(r) for r in xs[0].tolist()}
        while n_found + generated < o.pairs and tried < o.search_budget and len(free):
            n = min(2048, o.search_budget - tried)
            base = d.x[pool[torch.randint(len(pool), (n,), generator=g)]].clone()
            k = torch.randint(1, 4, (n, 1), generator=g)                        # 1–3 features per candidate
            pick = torch.rand(n, len(free), generator=g).argsort(1) < k
            rand = torch.floor(lo + torch.rand(n, len(lo), generator=g) * (hi - lo + 1)).clamp(max=hi)
            cols = base[:, free]
            base[:, free] = torch.where(pick, rand[:, free], cols)
            tried += n
            hit = base[discriminatory(model, base, self.idx, self.grid)]
            new = [r for r in hit.tolist() if tuple(r) not in seen and not seen.add(tuple(r))]
            new = new[: o.pairs - n_found - generated]
            if new:
                xn = torch.tensor(new)
                xs.append(xn)
                ys.append(predict(model, xn))                      # no true label: keep the model's
                generated += len(new)
        x = torch.cat(xs) if xs else d.x[:0]
        y = torch.cat(ys) if ys else d.y[:0]
        if len(x):
            copies = self.flip(x)
            pred = predict(model, copies.reshape(-1, x.shape[1])).view(len(x), len(self.grid))
            base_pred = predict(model, x)
            first = (pred != base_pred.unsqueeze(1)).float().argmax(1)   # first flip that changes the label
            twin = copies[torch.arange(len(x)), first]
        else:
            twin = x.clone()
        self.pairs = Pairs(x, twin, y, None, rows)
        self.evidence_info = {"from_pool": n_found, "generated": generated, "search_tried": tried,
                              "pool_size": len(pool), "pool_discrimination_rate": float(is_di.float().mean()),
                              "seconds": round(time.perf_counter() - t0, 3)}
        if len(x) == 0:
            raise NetmendError("no discriminatory instances found in the repair pool or by the search: nothing to repair"
                               " (raise -d search_budget=N)")
        return self

    def evidence(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pairs is None:
            raise NetmendError("fairness evidence depends on the model: call defect.bind(model) first")
        return self.pairs.corrupted, self.pairs.labels

    # -- what repairers use -----------------------------------------------------------------------
    def violation(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """max over flips |p₀(x') − p₀(x)| per instance (CARE's fairness output quantity), differentiable."""
        n, m = len(x), len(self.grid)
        z = model(torch.cat([x, self.flip(x).reshape(n * m, -1)]))
        p0 = F.softmax(z, -1)[..., 0]
        return (p0[n:].view(n, m) - p0[:n].unsqueeze(1)).abs().amax(1)

    def _flip_objective(self, x: torch.Tensor, x_good: torch.Tensor, y_good: torch.Tensor) -> Objective:
        """x_bad = [E rows; their E·M flipped copies]; a row is violated when any copy's label differs."""
        e, m = len(x), len(self.grid)
        x_bad = torch.cat([x, self.flip(x).reshape(e * m, -1)])

        def violated(logits: torch.Tensor) -> torch.Tensor:
            pred = logits.argmax(-1)
            return (pred[..., e:].unflatten(-1, (e, m)) != pred[..., :e].unsqueeze(-1)).any(-1)

        return Objective(x_bad, violated, x_good, y_good)

    def objective_rows(self) -> torch.Tensor:
        """The rows whose discrimination the objective counts (see FairnessOptions.objective)."""
        x = self.pairs.corrupted
        if self.options.objective == "pool":      # evidence rows taken from the validation part are left out
            val = set(self.repair.indices["val"])
            own = [j for j in range(len(x)) if j >= len(self.pairs.indices) or self.pairs.indices[j] not in val]
            rows = [i for i in self._pool if i not in val]
            x = torch.cat([x[own], self.data.x[torch.tensor(rows, dtype=torch.long)]])
        return x

    def objective(self, model: nn.Module) -> Objective:
        """x_bad = [rows; their flipped copies] (rows: the evidence instances, plus the repair pool outside its
        validation part when options.objective == "pool"); x_good = repair fit rows with their true labels."""
        self.bind(model)
        return self._flip_objective(self.objective_rows(), self.repair.x_fit, self.repair.y_fit)

    def validation_objective(self, model: nn.Module) -> Objective:
        """The same cost on the repair data's validation part only (its rows and their flips; true labels):
        repairers use it to choose among candidates, never to fit."""
        self.bind(model)
        return self._flip_objective(self.repair.x_val, self.repair.x_val, self.repair.y_val)

    # -- what users read --------------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, Any]:
        pred = predict(model, self.x_test)
        groups = group_ids(self.x_test, self.idx)
        out = {
            "clean_accuracy": float((pred == self.y_test).float().mean()),
            "discrimination_rate": float(discriminatory(model, self.x_test, self.idx, self.grid).float().mean()),
            "discrimination_rate_uniform": float(discriminatory(model, self.x_uniform, self.idx, self.grid).float().mean()),
            "demographic_parity_difference": demographic_parity_difference(pred, groups),
            "equalized_odds_difference": equalized_odds_difference(pred, self.y_test, groups),
            "n_test": int(len(self.y_test)), "n_uniform": int(len(self.x_uniform)),
        }
        if self.pairs is not None and len(self.pairs):
            out["discrimination_rate_evidence"] = float(discriminatory(model, self.pairs.corrupted, self.idx, self.grid)
                                                        .float().mean())
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"dataset": self.data.name, "protected": list(self.attributes), "protected_indices": self.idx,
                  "combinations": len(self.grid), "n_test": int(len(self.y_test)), "evidence": self.evidence_info})
        return d


def _splits(info: dict, n: int) -> dict[str, list[int]]:
    return split_tabular(n, info["split_seed"], info.get("test_fraction", 0.2), info.get("pool_fraction", 0.1))


@DEFECTS.register("fairness", "changing only a protected attribute changes the prediction", config=FairnessOptions)
def fairness_from_info(info: dict, options: FairnessOptions, data_dir=None, data: TabularData | None = None,
                       model: nn.Module | None = None) -> FairnessDefect:
    """Rebuild a model folder's fairness defect (dataset, split, protected attributes); bind to `model` if given."""
    options = options or FairnessOptions()
    data = data or load_tabular(info["dataset"], data_dir or info.get("data_dir"))
    protected = options.protected or info["defect"].get("protected")
    defect = FairnessDefect(data, _splits(info, len(data.y)), protected, options)
    return defect.bind(model) if model is not None else defect


# ----------------------------------------------------------------------------- trainer

@dataclass
class TabularTrainConfig:
    """ADF-style MLP training: unbalanced classes (as the fairness benchmarks), Adam, mini-batches."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0


DEFAULT_EPOCHS = {"credit": 100, "german": 100}
HIDDEN = (64, 32, 16, 8, 4)


def train_fairness(dataset: str, arch: str = "mlp", seed: int = 0, epochs: int | None = None, device: str = "cpu",
                   data_dir=None, protected: str | Sequence[str] | None = None, data: TabularData | None = None,
                   test_fraction: float = 0.2, pool_fraction: float = 0.1, **_: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Train the fairness-benchmark MLP (64-32-16-8-4) on a tabular dataset's train split; (model, model.json)."""
    from .. import __version__
    from ..train import fit
    from ..zoo.models import create_model

    data = data or load_tabular(dataset, data_dir)
    names = list(data.protected_indices(protected if protected else next(iter(data.protected))))
    cfg = TabularTrainConfig(epochs=int(epochs) if epochs else DEFAULT_EPOCHS.get(dataset, 20), seed=int(seed))
    splits = split_tabular(len(data.y), seed, test_fraction, pool_fraction)
    tr = torch.tensor(splits["train"])
    mean, std = data.stats(splits["train"])
    torch.manual_seed(cfg.seed)
    kwargs = {"hidden": list(HIDDEN)} if arch == "mlp" else {}
    model = create_model(arch, data.in_shape, data.num_classes, mean=mean, std=std, **kwargs)
    t0 = time.perf_counter()
    fit(model, data.x[tr], data.y[tr], cfg, device, desc=f"train {arch} on {dataset}")
    seconds = time.perf_counter() - t0
    model = model.cpu().eval()
    info: dict[str, Any] = {
        "netmend": __version__, "arch": arch,
        "arch_args": {"in_shape": data.in_shape, "num_classes": data.num_classes, "mean": mean, "std": std, **kwargs},
        "dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "classes": data.classes,
        "features": data.features, "domains": [[a, b] for a, b in zip(data.lo, data.hi)],
        "split_seed": int(seed), "test_fraction": test_fraction, "pool_fraction": pool_fraction,
        "n_train": len(tr), "n_pool": len(splits["repair_pool"]), "n_test": len(splits["test"]),
        "defect": {"kind": "fairness", "protected": names, "protected_indices": [data.protected[n] for n in names]},
        "training": {**asdict(cfg), "class_balanced": False, "seconds": seconds, "device": device},
    }
    defect = FairnessDefect(data, splits, names, FairnessOptions())
    info["metrics"] = {**defect.metrics(model), "majority_accuracy": float(max(defect.y_test.float().mean(),
                                                                               1 - defect.y_test.float().mean()))}
    return model, info


for _name, (_loader, _desc) in TABULAR.items():
    DATASETS.add(_name, _loader, _desc, kind="tabular", trainer=train_fairness)
