"""Tabular fairness data sets as integer codes with known per-feature domains.

Two sources, one shape (`TabularData`):
- the pre-discretised FEDIG/EIDIG CSVs `fairness/discretised/{census,credit,bank}.csv` (FEDIG's encoding),
  the benchmark default; their schema (names, domains, protected columns) is fixed here and checked;
- the raw UCI files (adult.data/.test, german.data, bank-full.csv), encoded the same FEDIG way:
  missing → column mode, categories → alphabetical index, numbers → FEDIG's bins.
Integer domains matter: the discrimination check flips a protected attribute through every value
of its domain, and uniform sampling draws from the whole box.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import NetmendError
from .datasets import find_file, resolve_data_dir


@dataclass
class TabularData:
    """All rows of one table: x (N×F float tensor of integer codes), y (int64 0/1) and the schema."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    features: list[str]
    lo: list[int]
    hi: list[int]
    protected: dict[str, int]          # attribute name -> feature index
    source: str = ""
    classes: list[str] = field(default_factory=lambda: ["0", "1"])

    @property
    def in_shape(self) -> list[int]:
        return [int(self.x.shape[1])]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def protected_indices(self, names: str | Sequence[str] | None) -> dict[str, int]:
        """Resolve `--protected` (one name, a comma list or a list) to {name: index}; unknown -> error."""
        if names is None or names == "" or names == []:
            raise NetmendError(f"{self.name}: name a protected attribute ({', '.join(self.protected)})")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        out = {}
        for n in names:
            if n not in self.protected:
                raise NetmendError(f"unknown protected attribute {n!r} for {self.name}; valid: {', '.join(self.protected)}")
            out[n] = self.protected[n]
        return out

    def stats(self, rows: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
        """Per-feature mean and std (floored) for the model's Normalize layer."""
        x = self.x if rows is None else self.x[torch.as_tensor(list(rows), dtype=torch.long)]
        return x.mean(0).tolist(), x.std(0).clamp_min(1e-3).tolist()

    def uniform(self, n: int, seed: int) -> torch.Tensor:
        """n inputs drawn uniformly from the integer box [lo, hi] (ADF/EIDIG "global" sampling)."""
        g = torch.Generator().manual_seed(int(seed))
        lo, hi = torch.tensor(self.lo, dtype=torch.float32), torch.tensor(self.hi, dtype=torch.float32)
        return torch.floor(lo + torch.rand(n, len(self.lo), generator=g) * (hi - lo + 1)).clamp(max=hi)


def split_tabular(n: int, seed: int, test_fraction: float = 0.2, pool_fraction: float = 0.1) -> dict[str, list[int]]:
    """Seeded row split into `train`, `repair_pool` (held out, what repairs may see) and `test`."""
    if n < 20:
        raise NetmendError(f"table too small to split ({n} rows)")
    if not (0 < test_fraction < 1 and 0 < pool_fraction < 1 and test_fraction + pool_fraction < 1):
        raise NetmendError(f"bad split fractions test={test_fraction} pool={pool_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_test, n_pool = max(1, round(test_fraction * n)), max(1, round(pool_fraction * n))
    return {"test": sorted(perm[:n_test]), "repair_pool": sorted(perm[n_test:n_test + n_pool]),
            "train": sorted(perm[n_test + n_pool:])}


# ----------------------------------------------------------------------------- discretised CSVs (FEDIG's encoding)

@dataclass(frozen=True)
class Schema:
    """Fixed layout of one discretised CSV: feature names with domains, label column, protected names."""

    features: tuple[tuple[str, int, int], ...]
    protected: tuple[tuple[str, str], ...]     # attribute name -> feature name
    label_first: bool = False


CENSUS = Schema((("age", 1, 4), ("workclass", 0, 7), ("fnlwgt", 1, 100), ("education_num", 1, 16),
                 ("marital_status", 0, 6), ("occupation", 0, 13), ("relationship", 0, 5), ("race", 0, 4),
                 ("sex", 0, 1), ("capital_gain", 1, 3), ("capital_loss", 1, 2), ("hours_per_week", 1, 4),
                 ("native_country", 0, 40)),
                (("sex", "sex"), ("race", "race"), ("age", "age")))
CREDIT = Schema((("checking_balance", 1, 4), ("duration", 1, 4), ("credit_history", 0, 4), ("amount", 1, 4),
                 ("savings", 1, 5), ("employment", 1, 5), ("personal_status_sex", 1, 4), ("residence", 1, 4),
                 ("property", 1, 4), ("age", 1, 4), ("other_plans", 1, 3), ("num_credits", 1, 4),
                 ("dependents", 1, 2), ("telephone", 1, 2), ("foreign_worker", 1, 2), ("purpose_car_new", 0, 1),
                 ("purpose_car_old", 0, 1), ("debtor_none", 0, 1), ("debtor_coapplicant", 0, 1),
                 ("housing_rent", 0, 1), ("housing_own", 0, 1), ("job_unemployed", 0, 1), ("job_unskilled", 0, 1),
                 ("job_skilled", 0, 1)),
                (("sex", "personal_status_sex"), ("age", "age")), label_first=True)
BANK = Schema((("age", 1, 4), ("job", 0, 10), ("marital", 0, 2), ("education", 0, 2), ("default", 0, 1),
               ("balance", 1, 4), ("housing", 0, 1), ("loan", 0, 1), ("contact", 0, 1), ("day", 1, 3),
               ("month", 1, 4), ("duration", 1, 4), ("campaign", 1, 4), ("pdays", 1, 4), ("previous", 1, 4),
               ("poutcome", 0, 2)),
              (("age", "age"),))


def read_int_csv(path: Path, n_cols: int) -> np.ndarray:
    """A headed CSV of integers with exactly n_cols columns; anything else is a one-line error."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise NetmendError(f"cannot read {path}: {exc}") from None
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise NetmendError(f"{path}: expected a header and data rows, got {len(rows)} line(s)")
    if len(rows[0]) != n_cols:
        raise NetmendError(f"{path}: expected {n_cols} columns, the header has {len(rows[0])}")
    try:
        arr = np.array([[int(float(v)) for v in r] for r in rows[1:]], dtype=np.int64)
    except ValueError as exc:
        raise NetmendError(f"{path}: not an integer-coded table ({exc})") from None
    return arr


def load_discretised(name: str, schema: Schema, filename: str, data_dir=None, path: Path | None = None) -> TabularData:
    path = path or find_file(resolve_data_dir(data_dir), [f"fairness/discretised/{filename}", f"discretised/{filename}",
                                                          filename], name)
    n_feat = len(schema.features)
    arr = read_int_csv(Path(path), n_feat + 1)
    y, x = (arr[:, 0], arr[:, 1:]) if schema.label_first else (arr[:, -1], arr[:, :-1])
    if not np.isin(y, (0, 1)).all():
        raise NetmendError(f"{path}: the label column must hold 0/1, found {sorted(set(y.tolist()))[:5]}")
    names = [f for f, _, _ in schema.features]
    lo, hi = [lo for _, lo, _ in schema.features], [hi for _, _, hi in schema.features]
    bad = [(names[j], int(x[:, j].min()), int(x[:, j].max())) for j in range(n_feat)
           if x[:, j].min() < lo[j] or x[:, j].max() > hi[j]]
    if bad:
        f, a, b = bad[0]
        raise NetmendError(f"{path}: feature {f} spans [{a}, {b}], outside its domain [{lo[names.index(f)]}, {hi[names.index(f)]}]"
                           " (not the expected encoding)")
    prot = {a: names.index(f) for a, f in schema.protected}
    return TabularData(name, torch.from_numpy(x).float(), torch.from_numpy(y).long(), names, lo, hi, prot, str(path))


# ----------------------------------------------------------------------------- raw UCI files, FEDIG-style

AGE_BINS = [15, 25, 45, 65, 120]   # (15,25] (25,45] (45,65] (65,120] -> 1..4


def _bins(v: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """digitize(v, edges, right=True): (e0, e1] -> 1, (e1, e2] -> 2, ..."""
    return np.digitize(v, np.asarray(edges, dtype=float), right=True)


def _quartiles(v: np.ndarray) -> np.ndarray:
    """Quartile bins 1..4 (≤ q25 -> 1, ..., > q75 -> 4)."""
    return np.digitize(v, np.percentile(v, [25, 50, 75]), right=True) + 1


def _category(col: list[str], missing: Sequence[str] = ("?",)) -> np.ndarray:
    """Missing -> the column's mode; then alphabetical index of the remaining values."""
    vals = [c for c in col if c not in missing]
    if not vals:
        raise NetmendError("a categorical column holds only missing values")
    uniq, counts = np.unique(vals, return_counts=True)
    mode = uniq[np.argmax(counts)]
    index = {u: i for i, u in enumerate(uniq)}
    return np.array([index[c if c not in missing else mode] for c in col], dtype=np.int64)


def _num(col: list[str], what: str) -> np.ndarray:
    try:
        return np.array([float(c) for c in col])
    except ValueError as exc:
        raise NetmendError(f"{what}: a numeric column holds text ({exc})") from None


def _tabular(name: str, cols: list[tuple[str, np.ndarray]], y: np.ndarray, protected: dict[str, str], source: str) -> TabularData:
    names = [n for n, _ in cols]
    x = np.stack([c for _, c in cols], 1).astype(np.int64)
    lo, hi = x.min(0).astype(int).tolist(), x.max(0).astype(int).tolist()
    return TabularData(name, torch.from_numpy(x).float(), torch.from_numpy(y.astype(np.int64)), names, lo, hi,
                       {a: names.index(f) for a, f in protected.items()}, source)


def _rows(path: Path, sep: str, n_cols: int, what: str, skip_header: bool = False) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise NetmendError(f"cannot read {path}: {exc}") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("|") or (skip_header and i == 0):
            continue
        r = [c.strip().strip('"') for c in (line.split(sep) if sep else line.split())]
        if len(r) != n_cols:
            raise NetmendError(f"{path}:{i + 1}: expected {n_cols} {what} fields, got {len(r)}")
        out.append(r)
    if not out:
        raise NetmendError(f"{path}: no data rows")
    return out


def load_adult(data_dir=None, folder: Path | None = None) -> TabularData:
    """UCI Adult (test rows first, then data rows: the order of census.csv), 13 features as in census.csv."""
    root = folder or find_file(resolve_data_dir(data_dir), ["fairness/adult-german-uci", "adult-german-uci", "."], "adult")
    rows = _rows(Path(root) / "adult.test", ",", 15, "adult") + _rows(Path(root) / "adult.data", ",", 15, "adult")
    c = list(zip(*rows))
    num = lambda j: _num(list(c[j]), "adult")  # noqa: E731
    cols = [("age", _bins(num(0), AGE_BINS)), ("workclass", _category(c[1])),
            ("fnlwgt", _bins(num(2), np.percentile(num(2), np.arange(0, 99))) + 1),   # = census.csv
            ("education_num", num(4)), ("marital_status", _category(c[5])), ("occupation", _category(c[6])),
            ("relationship", _category(c[7])), ("race", _category(c[8])), ("sex", _category(c[9])),
            ("capital_gain", _bins(num(10), [-1, 0, 99998, 99999])), ("capital_loss", _bins(num(11), [-1, 0, 99998, 99999])),
            ("hours_per_week", _bins(num(12), [0, 25, 40, 60, 168])), ("native_country", _category(c[13]))]
    y = np.array([lab.rstrip(".") == ">50K" for lab in c[14]], dtype=np.int64)
    return _tabular("adult", cols, y, {"sex": "sex", "race": "race", "age": "age"}, str(root))


GERMAN_CATEGORICAL = {0: "checking_status", 2: "credit_history", 3: "purpose", 5: "savings", 6: "employment",
                      9: "other_debtors", 11: "property", 13: "other_plans", 14: "housing", 16: "job",
                      18: "telephone", 19: "foreign_worker"}


def load_german(data_dir=None, path: Path | None = None) -> TabularData:
    """UCI Statlog German credit: A-codes -> alphabetical index, amounts/duration -> quartiles, age -> bins,
    personal status -> sex (male A91/A93/A94 -> 0, female A92/A95 -> 1, as ADF); label 1 = good credit."""
    path = path or find_file(resolve_data_dir(data_dir), ["fairness/adult-german-uci/german.data", "adult-german-uci/german.data",
                                                          "german.data"], "german")
    rows = _rows(Path(path), "", 21, "german")
    c = list(zip(*rows))
    num = lambda j: _num(list(c[j]), "german")  # noqa: E731
    numeric = {1: ("duration", _quartiles(num(1))), 4: ("amount", _quartiles(num(4))), 7: ("installment_rate", num(7)),
               8: ("sex", np.array([int(s in ("A92", "A95")) for s in c[8]])), 10: ("residence", num(10)),
               12: ("age", _bins(num(12), AGE_BINS)), 15: ("existing_credits", num(15)), 17: ("dependents", num(17))}
    cols = [(GERMAN_CATEGORICAL[j], _category(list(c[j]))) if j in GERMAN_CATEGORICAL else numeric[j] for j in range(20)]
    y = (num(20) == 1).astype(np.int64)
    return _tabular("german", cols, y, {"sex": "sex", "age": "age"}, str(path))


def load_bank_raw(data_dir=None, path: Path | None = None) -> TabularData:
    """UCI Bank marketing (bank-full.csv, `;`-separated), the 16 features coded as bank.csv."""
    path = path or find_file(resolve_data_dir(data_dir), ["fairness/bank/bank-full.csv", "bank/bank-full.csv", "bank-full.csv"],
                             "bank-raw")
    rows = _rows(Path(path), ";", 17, "bank", skip_header=True)
    c = list(zip(*rows))
    num = lambda j: _num(list(c[j]), "bank-raw")  # noqa: E731
    cat = lambda j: _category(list(c[j]), ("unknown",))  # noqa: E731
    month = _category(list(c[10]), ())
    cols = [("age", _bins(num(0), AGE_BINS)), ("job", cat(1)), ("marital", cat(2)), ("education", cat(3)),
            ("default", cat(4)), ("balance", _quartiles(num(5))), ("housing", cat(6)), ("loan", cat(7)),
            ("contact", cat(8)), ("day", _bins(num(9), [0, 10, 20, 31])), ("month", _bins(month, [-1, 2, 5, 8, 11])),
            ("duration", _quartiles(num(11))), ("campaign", _quartiles(num(12))), ("pdays", _quartiles(num(13))),
            ("previous", _quartiles(num(14))), ("poutcome", cat(15))]
    y = np.array([v == "yes" for v in c[16]], dtype=np.int64)
    return _tabular("bank-raw", cols, y, {"age": "age"}, str(path))


TABULAR: dict[str, tuple[Callable[..., TabularData], str]] = {
    "census": (lambda data_dir=None: load_discretised("census", CENSUS, "census.csv", data_dir),
               "Census/Adult income, 48,842 rows, 13 integer-coded features (FEDIG CSV); protected sex, race, age"),
    "credit": (lambda data_dir=None: load_discretised("credit", CREDIT, "credit.csv", data_dir),
               "German credit, 1,000 rows, 24 integer-coded features (FEDIG CSV); protected sex, age"),
    "bank": (lambda data_dir=None: load_discretised("bank", BANK, "bank.csv", data_dir),
             "Bank marketing, 45,211 rows, 16 integer-coded features (FEDIG CSV); protected age"),
    "adult": (load_adult, "raw UCI Adult (adult.data + adult.test) encoded like census.csv; protected sex, race, age"),
    "german": (load_german, "raw UCI German credit (german.data), FEDIG-style codes; protected sex, age"),
    "bank-raw": (load_bank_raw, "raw UCI bank-full.csv encoded like bank.csv; protected age"),
}


def load_tabular(name: str, data_dir=None) -> TabularData:
    if name not in TABULAR:
        raise NetmendError(f"unknown tabular dataset {name!r}; known: {', '.join(TABULAR)}")
    return TABULAR[name][0](data_dir=data_dir)
