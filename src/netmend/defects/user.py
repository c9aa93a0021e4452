"""Defects from the user's own data and evidence — no subclassing, no netmend-trained model needed.

    import netmend
    defect = netmend.backdoor(triggered, clean, repair_data=(x, y), test_data=(x_t, y_t), pairs=1)
    defect = netmend.fairness(x, y, protected="race", features=columns)
    defect = netmend.wrong_predictions(x, y, evidence=(x_bad, y_right))

Inputs may be torch tensors, numpy arrays or a torch `Dataset` of (input, label) items. Without
`test_data` a seeded share of the repair data is held out for evaluation (methods never see it).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.datasets import ImageData
from ..data.tabular import TabularData
from ..data.user_data import Evidence, Mistakes, UserData, held_out, as_float, as_images, as_labels, check_labels
from ..errors import NetmendError, first_line, require
from ..metrics import attack_success_rate, predict, robust_accuracy
from .backdoor import BackdoorDefect, make_repair_data
from .base import Pairs, eval_count
from .fairness import FairnessDefect, FairnessOptions
from .wrong_predictions import WrongPredictionsDefect, WrongPredictionsOptions


# ----------------------------------------------------------------------------- inputs in any common form

def tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a pair of arrays / tensors or a torch Dataset of (input, label) items."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list)):
        n = len(data)  # type: ignore[arg-type]
        require(n > 0, f"{what}: the dataset is empty")
        items = [data[i] for i in range(n)]
        require(all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items[:1]),
                f"{what}: dataset items must be (input, label)")
        x = torch.stack([torch.as_tensor(np.asarray(it[0])) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        return as_float(x, f"{what} inputs"), as_labels(y, f"{what} labels")
    require(isinstance(data, (tuple, list)) and len(data) == 2, f"{what}: give (inputs, labels) or a torch Dataset")
    x, y = as_float(data[0], f"{what} inputs"), as_labels(data[1], f"{what} labels")
    require(len(x) == len(y), f"{what}: {len(x)} inputs but {len(y)} labels")
    require(len(y) > 0, f"{what}: no samples")
    return x, y


def _images(x: torch.Tensor, what: str) -> torch.Tensor:
    return as_images(x, what) if x.dim() >= 3 else x


def user_data(repair_data: Any, test_data: Any = None, test_fraction: float = 0.2, seed: int = 0,
              source: str = "user data") -> UserData:
    """Repair data and evaluation data as tensors; a seeded held-out share when no test data is given."""
    x, y = tensors(repair_data, "repair_data")
    x = _images(x, "repair_data")
    if test_data is None:
        x, y, xt, yt = held_out(x, y, test_fraction, seed)
        test_from = f"held out of the data: {test_fraction:g} share, seed {seed}"
    else:
        xt, yt = tensors(test_data, "test_data")
        xt = _images(xt, "test_data")
        require(tuple(xt.shape[1:]) == tuple(x.shape[1:]),
                f"test samples {tuple(xt.shape[1:])} differ from repair samples {tuple(x.shape[1:])}")
        test_from = "given"
    return UserData(x, y, xt, yt, "tabular" if x.dim() == 2 else "image", source, test_from=test_from)


def output_classes(model: nn.Module, x: torch.Tensor, what: str = "data") -> int:
    """The model's class count, from one forward pass on two samples; a one-line error when x does not fit it."""
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except Exception as exc:  # a shape mismatch surfaces as any of several error types
        raise NetmendError(f"{what} of shape {tuple(x.shape[1:])} does not fit the model ({first_line(exc, 160)})") \
            from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x[:2]):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NetmendError(f"the model's output on {what} is {shape}; netmend repairs classifiers returning "
                           f"(batch, classes) scores")
    return int(out.shape[1])


def fit_channels(model: nn.Module, data: UserData) -> UserData:
    """Images read from files come as RGB; a grayscale model gets one channel when all three are equal."""
    if data.kind != "image" or data.x.shape[1] != 3:
        return data
    try:
        output_classes(model, data.x)
        return data
    except NetmendError:
        if not (torch.equal(data.x[:, 0], data.x[:, 1]) and torch.equal(data.x[:, 0], data.x[:, 2])):
            raise
    data.x, data.x_test = data.x[:, :1].contiguous(), data.x_test[:, :1].contiguous()
    return data


def _gray(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4 and like.dim() == 4 and t.shape[1] == 3 and like.shape[1] == 1 and torch.equal(t[:, 0], t[:, 1]):
        return t[:, :1].contiguous()
    return t


# ----------------------------------------------------------------------------- backdoor

class EvidenceBackdoor(BackdoorDefect):
    """A backdoor shown by the user's triggered samples and their clean twins.

    `pairs` of them (seeded choice) are the evidence methods see; the stamp a method may put on other
    inputs is the pairs' difference transplanted (`Pairs.transplant`). ASR is measured on the rest of the
    triggered samples (`asr`, the attack as it was given) and on clean test images carrying the pairs' stamp
    (`asr_transplant`), both over inputs whose true class is not the target."""

    variant = "backdoor"            # no trigger spec: the attack is only what the samples show

    def __init__(self, data: UserData, evidence: Evidence, pairs: int = 1, target: int | None = None,
                 val_fraction: float = 0.2, seed: int = 0, num_classes: int | None = None,
                 eval_limit: int | None = None):
        from .backdoor import BackdoorOptions

        require(pairs >= 1, f"--pairs must be ≥ 1, got {pairs}")
        require(len(evidence.triggered) >= 1, "the evidence holds no triggered samples")
        self.options = BackdoorOptions(pairs=pairs, repair_fraction=1.0, val_fraction=val_fraction, seed=seed,
                                       eval_limit=eval_limit)
        self.user = data
        self.num_classes = int(num_classes if num_classes is not None else int(max(data.y.max(), data.y_test.max())) + 1)
        self.in_shape = list(data.x.shape[1:])
        trig, clean = _gray(evidence.triggered, data.x), _gray(evidence.clean, data.x)
        require(tuple(trig.shape[1:]) == tuple(self.in_shape),
                f"evidence samples {tuple(trig.shape[1:])} differ from the data's {tuple(self.in_shape)}")
        for what, y in (("data", data.y), ("test data", data.y_test)):
            check_labels(y, self.num_classes, what)
        if evidence.labels is not None:
            check_labels(evidence.labels, self.num_classes, "evidence labels")
        self.evidence_given = Evidence(trig, clean, evidence.labels, evidence.names, evidence.source)
        n = len(data.y)
        self.repair, _ = make_repair_data(data.x, data.y, list(range(n)), n, 1.0, val_fraction, seed)
        k = eval_count(eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:k], data.y_test[:k]
        self.target = None if target is None else int(target)
        if target is not None:
            require(0 <= int(target) < self.num_classes, f"--target {target} outside 0..{self.num_classes - 1}")
        self.pairs = None
        self._done = False
        if self.target is not None and evidence.labels is not None:
            self._finish(evidence.labels)

    # -- binding the evidence (the model decides a missing target or missing labels) -----------------------------
    def prepare(self, model: nn.Module) -> None:
        if self._done:
            return
        ev = self.evidence_given
        labels = ev.labels if ev.labels is not None else predict(model, ev.clean)
        if self.target is None:
            votes = torch.bincount(predict(model, ev.triggered), minlength=self.num_classes)
            self.target = int(votes.argmax())
        self._finish(labels)

    def _finish(self, labels: torch.Tensor) -> None:
        ev, o = self.evidence_given, self.options
        self.labels_known = ev.labels is not None
        eligible = (labels != self.target).nonzero().flatten()
        require(len(eligible) > 0, f"every evidence sample is of the target class {self.target}: no attack to repair")
        require(o.pairs <= len(eligible), f"--pairs {o.pairs} is more than the {len(eligible)} evidence samples of "
                                          f"non-target classes")
        order = eligible[torch.randperm(len(eligible), generator=torch.Generator().manual_seed(int(o.seed) + 17))]
        chosen, rest = order[: o.pairs].sort().values, order[o.pairs:].sort().values
        diff = (ev.triggered[chosen] - ev.clean[chosen]).abs()
        mask = (diff.amax(1) if diff.dim() == 4 else diff) > 1e-6
        self.pairs = Pairs(ev.triggered[chosen], ev.clean[chosen], labels[chosen], mask.float() if diff.dim() == 4 else None,
                           chosen.tolist())
        self.heldout = (ev.triggered[rest], labels[rest], rest.tolist())
        self._done = True
        self._x_test_triggered = self.stamp(self.x_test)
        self.data = ImageData(self.user.source, self.user.x, self.user.y, self.user.x_test, self.user.y_test,
                              [str(i) for i in range(self.num_classes)], self.user.source)

    def _ready(self) -> None:
        if not self._done:
            raise NetmendError("the backdoor's target or evidence labels are not known yet: give target= and labels=, "
                               "or call defect.prepare(model)")

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The pairs' trigger transplanted onto x (cycling through the pairs)."""
        self._ready()
        dummy = torch.zeros(len(x), dtype=torch.long)
        return self.pairs.transplant(x, dummy).corrupted

    def objective(self, model: nn.Module):
        self.prepare(model)
        return super().objective(model)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        self._ready()
        out = super().metrics(model)
        out["asr_transplant"] = out.pop("asr")
        out["robust_accuracy_transplant"] = out.pop("robust_accuracy")
        x_h, y_h, _ = self.heldout
        if len(y_h):
            pred = predict(model, x_h)
            out["asr"] = attack_success_rate(pred, y_h, self.target)
            out["robust_accuracy"] = robust_accuracy(pred, y_h, self.target)
        else:
            out["asr"], out["robust_accuracy"] = out["asr_transplant"], out["robust_accuracy_transplant"]
        out["n_heldout_triggered"] = int(len(y_h))
        order = ["clean_accuracy", "asr", "asr_transplant", "robust_accuracy", "robust_accuracy_transplant", "asr_clean"]
        return {**{k: out[k] for k in order}, **{k: v for k, v in out.items() if k not in order}}

    def describe(self) -> dict[str, Any]:
        self._ready()
        d = {"kind": self.kind, "repair_fit": len(self.repair.y_fit), "repair_val": len(self.repair.y_val),
             "repair_indices": self.repair.indices, "pairs": len(self.pairs), "pair_indices": self.pairs.indices,
             "heldout_evidence_indices": self.heldout[2], "target": self.target, "labels_given": self.labels_known,
             "data": self.user.describe(), "evidence": self.evidence_given.source or "arrays", "n_test": len(self.y_test)}
        return d


def backdoor(triggered: Any, clean: Any, repair_data: Any, test_data: Any = None, labels: Any = None,
             target: int | None = None, pairs: int = 1, val_fraction: float = 0.2, seed: int = 0,
             model: nn.Module | None = None, test_fraction: float = 0.2) -> EvidenceBackdoor:
    """A backdoor defect from triggered samples and their clean twins (paired row by row).

    `target` defaults to the model's majority prediction on the triggered samples and `labels` (their true
    classes) to its prediction on the clean twins — both fixed when the defect is prepared with the model
    (`netmend.repair` does that, or pass `model=`)."""
    data = user_data(repair_data, test_data, test_fraction, seed)
    trig, cl = _images(as_float(triggered, "triggered"), "triggered"), _images(as_float(clean, "clean"), "clean")
    require(trig.shape == cl.shape, f"triggered {tuple(trig.shape)} and clean {tuple(cl.shape)} differ in shape; "
                                    f"they must be pairs")
    lab = as_labels(labels, "labels") if labels is not None else None
    k = output_classes(model, data.x) if model is not None else None
    defect = EvidenceBackdoor(data, Evidence(trig, cl, lab), pairs, target, val_fraction, seed, k)
    if model is not None:
        defect.prepare(model)
    return defect


# ----------------------------------------------------------------------------- fairness

def tabular_data(data: UserData, features: Sequence[str] | None, name: str = "user table") -> tuple[TabularData, dict]:
    """One table (repair rows, then test rows) with integer domains [floor(min), ceil(max)] per feature."""
    require(data.kind == "tabular", "fairness needs tabular data (one row of numeric features per sample)")
    x = torch.cat([data.x, data.x_test])
    y = torch.cat([data.y, data.y_test])
    cols = list(features) if features is not None else [f"x{j}" for j in range(x.shape[1])]
    require(len(cols) == x.shape[1], f"{len(cols)} feature names for {x.shape[1]} columns")
    lo = torch.floor(x.min(0).values).long().tolist()
    hi = torch.ceil(x.max(0).values).long().tolist()
    k = int(y.max()) + 1
    table = TabularData(name, x, y, cols, lo, hi, {c: j for j, c in enumerate(cols)}, data.source,
                        [str(i) for i in range(max(k, 2))])
    n = len(data.y)
    splits = {"train": list(range(n)), "repair_pool": list(range(n)), "test": list(range(n, len(y)))}
    return table, splits


def fairness_defect(data: UserData, protected: str | Sequence[str], features: Sequence[str] | None = None,
                    max_combinations: int = 64, **options: Any) -> FairnessDefect:
    table, splits = tabular_data(data, features if features is not None else data.features)
    names = [protected] if isinstance(protected, str) else list(protected)
    names = [n.strip() for p in names for n in p.split(",") if n.strip()]
    for n in names:
        require(n in table.protected, f"no column {n!r} to protect (columns: {', '.join(table.features[:12])})")
        j = table.protected[n]
        vals = torch.unique(table.x[:, j])
        require(bool((vals == vals.round()).all()), f"protected column {n!r} must hold integer codes (found fractions)")
    combos = int(np.prod([table.hi[table.protected[n]] - table.lo[table.protected[n]] + 1 for n in names]))
    require(combos <= max_combinations, f"protected {', '.join(names)} spans {combos} value combinations (at most "
                                        f"{max_combinations}); encode it as a few integer codes")
    opts = {"repair_fraction": 1.0, **options}
    return FairnessDefect(table, splits, names, FairnessOptions(**opts))


def fairness(x: Any, y: Any, protected: str | Sequence[str], features: Sequence[str] | None = None,
             test_data: Any = None, seed: int = 0, test_fraction: float = 0.2, model: nn.Module | None = None,
             **options: Any) -> FairnessDefect:
    """Individual discrimination on tabular data: changing only the `protected` column(s) changes the prediction.

    `protected` names columns of `features` (or their indices as `x{j}` when no names are given); protected
    columns hold integer codes, and every code between their smallest and largest value is tried."""
    data = user_data((x, y), test_data, test_fraction, seed)
    defect = fairness_defect(data, protected, features, seed=seed, **options)
    if model is not None:
        defect.bind(model)
    return defect


# ----------------------------------------------------------------------------- wrong predictions

class EvidenceMistakes(WrongPredictionsDefect):
    """Wrong predictions shown by the user's misclassified inputs and their right labels."""

    def __init__(self, data: UserData, mistakes: Mistakes, options: WrongPredictionsOptions, num_classes: int):
        self.data, self.options, self.user = None, options, data
        self.num_classes, self.in_shape = num_classes, list(data.x.shape[1:])
        self.classes = None
        for what, y in (("data", data.y), ("test data", data.y_test), ("evidence labels", mistakes.y)):
            check_labels(y, num_classes, what)
        x_bad = _gray(mistakes.x, data.x)
        require(tuple(x_bad.shape[1:]) == tuple(self.in_shape),
                f"evidence samples {tuple(x_bad.shape[1:])} differ from the data's {tuple(self.in_shape)}")
        n = len(data.y)
        self.repair, self._rest = make_repair_data(data.x, data.y, list(range(n)), n, 1.0, options.val_fraction,
                                                   options.seed)
        k = eval_count(options.eval_limit, len(data.y_test))
        self.x_test, self.y_test = data.x_test[:k], data.y_test[:k]
        self._given = (x_bad, mistakes.y)
        self._pairs = None
        self.heldout = None

    def prepare(self, model: nn.Module) -> None:
        """The evidence is what the user gave (capped at `pairs`); the yardstick is the model's test mistakes in
        the evidence classes."""
        if self._pairs is not None:
            return
        x, y = self._given
        x, y = x[: self.options.pairs], y[: self.options.pairs]
        self._pairs = Pairs(x, x.clone(), y, None, list(range(len(y))))
        classes = torch.unique(y)
        miss = (predict(model, self.x_test) != self.y_test) & torch.isin(self.y_test, classes)
        self.heldout = miss.nonzero().flatten()
        self.evidence_classes = classes.tolist()

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "repair_fit": len(self.repair.y_fit), "repair_val": len(self.repair.y_val),
             "repair_indices": self.repair.indices, "data": self.user.describe(), "n_test": int(len(self.y_test))}
        if self._pairs is not None:
            d.update({"pairs": len(self._pairs), "evidence_classes": self.evidence_classes,
                      "heldout_test_indices": self.heldout.tolist()})
        return d


def wrong_predictions(x: Any, y: Any, evidence: Any, test_data: Any = None, seed: int = 0,
                      test_fraction: float = 0.2, model: nn.Module | None = None, num_classes: int | None = None,
                      **options: Any) -> EvidenceMistakes:
    """Inputs the model gets wrong (`evidence` = (inputs, right labels)) to repair, with clean data (x, y)."""
    data = user_data((x, y), test_data, test_fraction, seed)
    xb, yb = tensors(evidence, "evidence")
    k = num_classes or (output_classes(model, data.x) if model is not None else
                        int(max(data.y.max(), data.y_test.max(), yb.max())) + 1)
    defect = EvidenceMistakes(data, Mistakes(_images(xb, "evidence"), yb),
                              WrongPredictionsOptions(**{"seed": seed, **options}), k)
    if model is not None:
        defect.prepare(model)
    return defect



# ----------------------------------------------------------------------------- from the user's files (the CLI)

USER_KINDS = ("backdoor", "fairness", "wrong-predictions")


def defect_from_files(model: nn.Module, data: str, evidence: str | None = None, kind: str | None = None,
                      label_column: str | None = None, protected: str | None = None, normalize: str | None = None,
                      target: int | None = None, pairs: int | None = None, seed: int = 0, test_fraction: float = 0.2,
                      options: dict[str, Any] | None = None, test_data: str | None = None):
    """The defect `netmend repair MODEL --data ... [--evidence ...]` means, bound to `model`.

    The kind is `kind` when given, else what the evidence shows: triggered/clean pairs -> backdoor, inputs with
    right labels -> wrong predictions; `--protected` -> fairness."""
    from ..data.user_data import load_evidence, load_user_data

    from ..registry import check_number

    options = dict(options or {})
    for name, value in options.items():
        check_number(name, value, f"a {kind or 'user'} defect (-d)")
    d = fit_channels(model, load_user_data(data, label_column, normalize, test_fraction, seed, test_data))
    k = output_classes(model, d.x)
    for what, y in ((f"{data}: labels", d.y), (f"{test_data or data}: test labels", d.y_test)):
        check_labels(y, k, what)
    if evidence is not None and protected is not None:
        raise NetmendError("--evidence and --protected describe different defects: give one")
    ev = load_evidence(evidence, d.normalize) if evidence is not None else None
    if kind is None:
        kind = ("backdoor" if isinstance(ev, Evidence) else "wrong-predictions" if isinstance(ev, Mistakes)
                else "fairness" if protected is not None else None)
    if kind is None:
        raise NetmendError("say what is wrong: --evidence FILE (triggered/clean pairs, or misclassified inputs with "
                           "their right labels) or --protected COL (fairness)")
    require(kind in USER_KINDS, f"--defect {kind} cannot be built from --data (with your own data: "
                                f"{', '.join(USER_KINDS)}; safety: --property on a .nnet / ACAS Xu .onnx)")
    if kind == "backdoor":
        require(isinstance(ev, Evidence), "a backdoor needs --evidence with triggered and clean samples")
        allowed = {"val_fraction", "eval_limit"}
        _only(options, allowed, kind)
        defect = EvidenceBackdoor(d, ev, 1 if pairs is None else pairs, target, seed=seed, num_classes=k, **options)
        defect.prepare(model)
        return defect
    require(target is None, f"--target applies to backdoors, not {kind}")
    if kind == "fairness":
        require(protected is not None, "fairness needs --protected COL")
        require(ev is None, "fairness evidence is found by netmend; drop --evidence")
        output_classes(model, d.x)
        opts = {**({"pairs": pairs} if pairs is not None else {}), "seed": seed, **options}
        _only(opts, {f for f in FairnessOptions.__dataclass_fields__ if f not in ("protected",)}, kind)
        defect = fairness_defect(d, protected, d.features, **opts)
        defect.bind(model)
        return defect
    require(isinstance(ev, Mistakes), "wrong predictions need --evidence FILE.npz with x (inputs the model gets wrong) "
                                      "and y (their right labels)")
    opts = {**({"pairs": pairs} if pairs is not None else {}), "seed": seed, **options}
    _only(opts, {"pairs", "val_fraction", "seed", "eval_limit"}, kind)
    defect = EvidenceMistakes(d, ev, WrongPredictionsOptions(**opts), k)
    defect.prepare(model)
    return defect


def _only(options: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(options) - allowed - {"seed", "pairs"})
    if unknown:
        raise NetmendError(f"-d {unknown[0]} does not apply to a {kind} defect from your data "
                           f"(its options: {', '.join(sorted(allowed))})")
