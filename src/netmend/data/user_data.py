"""The user's own data and evidence, read from the files they have.

Data (`--data`): `FILE.npz` (arrays `x`, `y`; optional `x_test`, `y_test`), an image tree
`[train|test/]<class>/<image>` or its tar.gz, or `FILE.csv` with `--label-column` (every other
column numeric). Without a test split a seeded share of `x` is held out for evaluation: a method
never sees it.

Evidence (`--evidence`): `FILE.npz` with `triggered`, `clean` (paired row by row) and optional
`labels` — a backdoor; or `x`, `y` — inputs the model gets wrong, with their right labels. Or a
folder `triggered/NAME.png` + `clean/NAME.png` paired by file name.
"""
from __future__ import annotations

import csv
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import NetmendError, require
from .datasets import IMAGE_SUFFIXES, decode_image, read_class_folders


@dataclass
class UserData:
    """Clean data the user holds (`x`, `y`: what methods may use) and held-out evaluation data."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    kind: str                                    # "image" | "tabular"
    source: str
    features: list[str] | None = None            # tabular column names (label excluded)
    classes: list[str] | None = None             # class names of an image tree
    test_from: str = "given"                     # "given" or "held out of x (seeded share)"
    normalize: dict[str, list[float]] | None = None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "n_repair": int(len(self.y)), "n_test": int(len(self.y_test)),
                "test": self.test_from, "in_shape": list(self.x.shape[1:]), "normalize": self.normalize}


@dataclass
class Evidence:
    """Backdoor evidence: triggered inputs and their clean twins (labels = true classes, when known)."""

    triggered: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)
    source: str = ""


@dataclass
class Mistakes:
    """Wrong-predictions evidence: inputs the model gets wrong, with their right labels."""

    x: torch.Tensor
    y: torch.Tensor
    source: str = ""


# ----------------------------------------------------------------------------- checks shared by every reader

def as_float(a: Any, what: str) -> torch.Tensor:
    """An array (numpy or torch) as float32: uint8 images scaled to [0, 1]; NaN / Inf refused."""
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16,
                                                                              torch.int32, torch.int64)):
        raise NetmendError(f"{what}: expected numbers, got {t.dtype}")
    out = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if not torch.isfinite(out).all():
        raise NetmendError(f"{what} contains NaN or infinite values")
    return out


MAX_LABEL = 99_999              # the largest class index (netmend.schema allows 100,000 classes)
PIXEL_TOLERANCE = 1e-5        # float images may stray this far outside [0, 1] (rounding), no further


def as_pixels(a: Any, what: str) -> torch.Tensor:
    """Images from a file as float32 in [0, 1], the convention of every image netmend reads: uint8 (or another
    integer type holding 0..255) is scaled by 1/255; floats must already lie in [0, 1] — nothing is wrapped,
    clipped or rescaled silently (--normalize then applies the preprocessing the model expects)."""
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.is_floating_point():
        out = as_float(t, what)
        if out.numel() and (float(out.min()) < -PIXEL_TOLERANCE or float(out.max()) > 1 + PIXEL_TOLERANCE):
            raise NetmendError(f"{what}: float images must hold values in [0, 1], found {float(out.min()):g} .. "
                               f"{float(out.max()):g} (give uint8 0–255 or floats in [0, 1]; --normalize applies the "
                               f"model's preprocessing afterwards)")
        return out
    out = as_float(t, what)
    if t.dtype != torch.uint8 and out.numel() and (float(out.min()) < 0 or float(out.max()) > 255):
        raise NetmendError(f"{what}: integer pixel values must lie in 0..255, found {int(out.min())} .. {int(out.max())}")
    return out if t.dtype == torch.uint8 else out / 255.0


def as_labels(a: Any, what: str) -> torch.Tensor:
    """Integer class labels (a float array holding whole numbers is accepted)."""
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.dim() != 1:
        raise NetmendError(f"{what}: labels must be one number per sample, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise NetmendError(f"{what}: labels must be whole class indices (found fractional or NaN values)")
    elif t.dtype == torch.bool or not t.dtype.is_signed and t.dtype != torch.uint8:
        raise NetmendError(f"{what}: labels must be integers, got {t.dtype}")
    if len(t) and float(t.max()) > MAX_LABEL:
        raise NetmendError(f"{what}: label {float(t.max()):g} is larger than any class index netmend takes "
                           f"(at most {MAX_LABEL})")
    t = t.long()
    if len(t) and int(t.min()) < 0:
        raise NetmendError(f"{what}: negative label {int(t.min())}")
    return t


def as_images(x: torch.Tensor, what: str) -> torch.Tensor:
    """N×C×H×W (N×H×W gets one channel; N×H×W×C with C in 1, 3, 4 is moved to channels-first)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.permute(0, 3, 1, 2).contiguous()
    return x


def check_labels(y: torch.Tensor, num_classes: int, what: str) -> None:
    if len(y) and int(y.max()) >= num_classes:
        raise NetmendError(f"{what}: label {int(y.max())} is outside the model's {num_classes} classes (0..{num_classes - 1})")


def parse_normalize(text: str | Sequence[float] | None, channels: int) -> dict[str, list[float]] | None:
    """`--normalize MEAN,STD` (one of each for every channel) or C means then C stds."""
    if text is None or text == "":
        return None
    try:
        vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise NetmendError(f"--normalize expects numbers MEAN,STD, got {text!r}") from None
    if len(vals) == 2:
        mean, std = [vals[0]] * channels, [vals[1]] * channels
    elif len(vals) == 2 * channels:
        mean, std = vals[:channels], vals[channels:]
    else:
        raise NetmendError(f"--normalize takes MEAN,STD or {channels} means then {channels} stds, got {len(vals)} numbers")
    if any(not np.isfinite(v) for v in vals) or any(s <= 0 for s in std):
        raise NetmendError(f"--normalize: standard deviations must be positive and every value finite, got {text!r}")
    return {"mean": mean, "std": std}


def normalized(x: torch.Tensor, norm: dict[str, list[float]] | None) -> torch.Tensor:
    if norm is None:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - torch.tensor(norm["mean"]).view(shape)) / torch.tensor(norm["std"]).view(shape)


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise NetmendError(f"{path}: holds Python objects (pickled arrays); save plain numeric arrays") from None
        raise NetmendError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0][:120]})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise NetmendError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0][:120]})") from None


def held_out(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    require(0 < fraction < 1, f"--test-fraction must be in (0, 1), got {fraction}")
    n = len(y)
    n_test = int(round(fraction * n))
    require(n_test >= 1 and n - n_test >= 2, f"{n} samples are too few to hold out a test share; give x_test / y_test")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 4242))
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[tr], y[tr], x[te], y[te]


# ----------------------------------------------------------------------------- data

def load_user_data(path: str | os.PathLike, label_column: str | None = None, normalize: str | None = None,
                   test_fraction: float = 0.2, seed: int = 0, test_path: str | os.PathLike | None = None) -> UserData:
    """Read `--data` (npz, image tree / tar.gz, or csv) into repair and evaluation tensors; `test_path` (`--test-data`,
    the same formats) gives the evaluation data instead of a held-out share."""
    if test_path is not None:
        data = load_user_data(path, label_column, None, 0.2, seed)
        test = load_user_data(test_path, label_column, None, 0.2, seed)
        x = torch.cat([data.x, data.x_test]) if data.test_from != "given" else data.x
        y = torch.cat([data.y, data.y_test]) if data.test_from != "given" else data.y
        xt = torch.cat([test.x, test.x_test])
        yt = torch.cat([test.y, test.y_test])
        require(tuple(xt.shape[1:]) == tuple(x.shape[1:]), f"{test_path}: samples {tuple(xt.shape[1:])} differ from "
                                                          f"{path}'s {tuple(x.shape[1:])}")
        require(data.features == test.features, f"{test_path}: columns differ from {path}'s")
        if data.test_from == "given":
            raise NetmendError(f"{path} holds x_test / y_test already; drop --test-data or those arrays")
        norm = parse_normalize(normalize, x.shape[1]) if normalize is not None else None
        if norm is not None:
            require(data.kind == "image", "--normalize applies to images (scale tabular features inside the model)")
            x, xt = normalized(x, norm), normalized(xt, norm)
        return UserData(x, y, xt, yt, data.kind, str(path), data.features, data.classes, f"given: {test_path}", norm)
    p = Path(path)
    if not p.exists():
        raise NetmendError(f"data not found: {p}")
    name = p.name.lower()
    if name.endswith(".csv"):
        require(label_column is not None, f"{p}: a CSV needs --label-column COL (the column holding the class)")
        x, y, features = read_csv_table(p, label_column)
        kind, classes = "tabular", None
        x_test = y_test = None
    elif label_column is not None:
        raise NetmendError("--label-column applies to CSV data")
    elif name.endswith(".npz"):
        arrays = _npz(p)
        missing = [k for k in ("x", "y") if k not in arrays]
        require(not missing, f"{p}: needs arrays x and y (found {', '.join(sorted(arrays)) or 'none'})")
        require(("x_test" in arrays) == ("y_test" in arrays), f"{p}: give both x_test and y_test, or neither")
        kind = "tabular" if np.ndim(arrays["x"]) == 2 else "image"
        read = as_float if kind == "tabular" else as_pixels
        x, y = read(arrays["x"], f"{p}: x"), as_labels(arrays["y"], f"{p}: y")
        x_test = read(arrays["x_test"], f"{p}: x_test") if "x_test" in arrays else None
        y_test = as_labels(arrays["y_test"], f"{p}: y_test") if "y_test" in arrays else None
        features, classes = None, None
        if kind == "image":
            x = as_images(x, f"{p}: x")
            x_test = as_images(x_test, f"{p}: x_test") if x_test is not None else None
    elif p.is_dir() or name.endswith((".tar.gz", ".tgz", ".tar")):
        groups = read_class_folders(p)
        first = next(iter(groups.values()))
        classes = first[2]
        train = groups.get("train", groups.get("all"))
        require(train is not None, f"{p}: found only a test/ split; the repair data goes under train/")
        x, y = torch.from_numpy(train[0]).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(train[1]).long()
        x_test = y_test = None
        if "test" in groups:
            x_test = torch.from_numpy(groups["test"][0]).permute(0, 3, 1, 2).float() / 255.0
            y_test = torch.from_numpy(groups["test"][1]).long()
        kind, features = "image", None
    else:
        raise NetmendError(f"{p}: unknown data format (give FILE.npz, FILE.csv, an image folder or its .tar.gz)")
    require(len(y) > 0, f"{p}: no samples")
    require(len(x) == len(y), f"{p}: {len(x)} inputs but {len(y)} labels")
    if x_test is not None:
        require(len(x_test) == len(y_test) and len(y_test) > 0, f"{p}: x_test and y_test must be non-empty and "
                                                                f"of one length ({len(x_test)} vs {len(y_test)})")
        require(tuple(x_test.shape[1:]) == tuple(x.shape[1:]), f"{p}: x_test samples {tuple(x_test.shape[1:])} differ "
                                                              f"from x samples {tuple(x.shape[1:])}")
        test_from = "given"
    else:
        x, y, x_test, y_test = held_out(x, y, test_fraction, seed)
        test_from = f"held out of the data: {test_fraction:g} share, seed {seed}"
    norm = None
    if normalize is not None:
        require(kind == "image", "--normalize applies to images (scale tabular features inside the model)")
        norm = parse_normalize(normalize, x.shape[1])
        x, x_test = normalized(x, norm), normalized(x_test, norm)
    return UserData(x, y, x_test, y_test, kind, str(p), features, classes, test_from, norm)


def read_csv_table(path: Path, label_column: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Numeric feature columns and an integer label column from a CSV with a header row."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise NetmendError(f"cannot read CSV {path}: {str(exc).splitlines()[0][:120]}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    require(len(rows) >= 2, f"{path}: no data rows (a header line and at least one row are needed)")
    header = [h.strip() for h in rows[0]]
    require(label_column in header, f"{path}: no column {label_column!r} (columns: {', '.join(header[:12])}"
                                    f"{' ...' if len(header) > 12 else ''})")
    require(len(set(header)) == len(header), f"{path}: duplicate column names in the header")
    width = len(header)
    for i, r in enumerate(rows[1:], start=2):
        require(len(r) == width, f"{path}: line {i} has {len(r)} fields, the header {width}")
    data = np.empty((len(rows) - 1, width), dtype=np.float64)
    for j, name in enumerate(header):
        for i, r in enumerate(rows[1:]):
            try:
                data[i, j] = float(r[j])
            except ValueError:
                raise NetmendError(f"{path}: column {name!r} is not numeric (line {i + 2}: {r[j][:30]!r}); encode it "
                                   f"as numbers first") from None
    if not np.isfinite(data).all():
        j = int(np.argwhere(~np.isfinite(data))[0][1])
        raise NetmendError(f"{path}: column {header[j]!r} holds NaN or infinite values")
    li = header.index(label_column)
    y = as_labels(data[:, li], f"{path}: column {label_column!r}")
    features = [h for j, h in enumerate(header) if j != li]
    x = torch.from_numpy(np.delete(data, li, axis=1)).float()
    return x, y, features


# ----------------------------------------------------------------------------- evidence

def load_evidence(path: str | os.PathLike, normalize: dict[str, list[float]] | None = None) -> Evidence | Mistakes:
    """Read `--evidence`: backdoor pairs (npz triggered/clean[/labels] or a triggered/ + clean/ folder) or
    wrong predictions (npz x/y)."""
    p = Path(path)
    if not p.exists():
        raise NetmendError(f"evidence not found: {p}")
    if p.is_dir():
        ev = _evidence_folder(p)
    elif p.name.lower().endswith(".npz"):
        arrays = _npz(p)
        if "triggered" in arrays or "clean" in arrays:
            missing = [k for k in ("triggered", "clean") if k not in arrays]
            if missing:
                raise NetmendError(f"{p}: backdoor evidence needs arrays triggered and clean (missing {missing[0]})")
            read = as_pixels if np.ndim(arrays["triggered"]) >= 3 else as_float
            ev = Evidence(read(arrays["triggered"], f"{p}: triggered"), read(arrays["clean"], f"{p}: clean"),
                          as_labels(arrays["labels"], f"{p}: labels") if "labels" in arrays else None, source=str(p))
        elif "x" in arrays and "y" in arrays:
            x = (as_pixels if np.ndim(arrays["x"]) >= 3 else as_float)(arrays["x"], f"{p}: x")
            m = Mistakes(as_images(x, f"{p}: x") if x.dim() >= 3 else x, as_labels(arrays["y"], f"{p}: y"), str(p))
            require(len(m.x) == len(m.y) and len(m.y) > 0, f"{p}: x and y must be non-empty and of one length")
            return Mistakes(normalized(m.x, normalize) if m.x.dim() == 4 else m.x, m.y, m.source)
        else:
            raise NetmendError(f"{p}: evidence needs arrays triggered + clean (a backdoor) or x + y (wrong predictions); "
                               f"found {', '.join(sorted(arrays)) or 'none'}")
    else:
        raise NetmendError(f"{p}: evidence must be a .npz file or a folder with triggered/ and clean/")
    t, c = ev.triggered, ev.clean
    if t.dim() >= 3:
        t, c = as_images(t, f"{p}: triggered"), as_images(c, f"{p}: clean")
    require(len(t) > 0, f"{p}: no evidence samples")
    require(t.shape == c.shape, f"{p}: triggered {tuple(t.shape)} and clean {tuple(c.shape)} differ in shape; they "
                                f"must be pairs")
    if ev.labels is not None:
        require(len(ev.labels) == len(t), f"{p}: {len(t)} pairs but {len(ev.labels)} labels")
    if bool((t == c).flatten(1).all(1).all()):
        raise NetmendError(f"{p}: every triggered sample equals its clean twin: the evidence shows no trigger")
    return Evidence(normalized(t, normalize), normalized(c, normalize), ev.labels, ev.names, ev.source)


def _evidence_folder(p: Path) -> Evidence:
    dirs = {d: p / d for d in ("triggered", "clean")}
    for d, q in dirs.items():
        require(q.is_dir(), f"{p}: evidence folder needs {d}/ (images paired by file name with "
                            f"{'clean' if d == 'triggered' else 'triggered'}/)")
    files = {d: {f.stem: f for f in sorted(q.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES} for d, q in dirs.items()}
    only_t = sorted(set(files["triggered"]) - set(files["clean"]))
    only_c = sorted(set(files["clean"]) - set(files["triggered"]))
    if only_t:
        raise NetmendError(f"{p}: triggered/{files['triggered'][only_t[0]].name} has no twin in clean/")
    if only_c:
        raise NetmendError(f"{p}: clean/{files['clean'][only_c[0]].name} has no twin in triggered/")
    names = sorted(files["triggered"])
    require(names, f"{p}: no images in triggered/ and clean/")

    def read(d: str) -> torch.Tensor:
        imgs = []
        for n in names:
            try:
                imgs.append(decode_image(files[d][n].read_bytes()))
            except (OSError, ValueError) as exc:
                raise NetmendError(f"cannot decode {files[d][n]}: {exc}") from None
        shapes = {a.shape for a in imgs}
        require(len(shapes) == 1, f"{p}/{d}: images of different sizes {sorted(shapes)[:2]}")
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0

    return Evidence(read("triggered"), read("clean"), None, names, str(p))
