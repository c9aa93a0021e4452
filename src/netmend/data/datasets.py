"""Image datasets in the formats users have, with seeded splits whose indices are recorded.

Formats: IDX gz (MNIST, Fashion-MNIST), the mnist_5k CSV, class-folder images and a tar.gz of
class folders (the CIFAR-10 JPEG copy). `digits` (scikit-learn's bundled 8×8 digits) is the
embedded default: no download, no shared folder.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import NetmendError, first_line
from ..registry import DATASETS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MAX_IMAGE_PIXELS = 4096 * 4096          # per image, read from its header before it is decoded
MAX_IMAGE_BYTES = 256 * 1024 * 1024     # per image file (a tar member's declared size is checked before reading)


@dataclass
class ImageData:
    """Train and test tensors (N×C×H×W floats in [0, 1], int64 labels) and what they are."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def in_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        x = self.x_train.transpose(0, 1).reshape(self.x_train.shape[1], -1)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


# ----------------------------------------------------------------------------- where data lives

def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """--data-dir, else $NETMEND_DATA, else the development checkout's data folder (below) when present."""
    if data_dir:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise NetmendError(f"data directory not found: {p}")
        return p
    env = os.environ.get("NETMEND_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise NetmendError(f"NETMEND_DATA points to a missing directory: {p}")
        return p
    here = Path(__file__).resolve()
    for cand in (Path.cwd() / ".." / "shared" / "data", here.parents[4] / "shared" / "data" if len(here.parents) > 4 else None):
        if cand is not None and cand.is_dir():
            return cand.resolve()
    return None


def find_file(data_dir: Path | None, names: list[str], what: str) -> Path:
    """First existing path among data_dir/<name> for the candidate relative names."""
    if data_dir is None:
        raise NetmendError(f"{what}: no data directory; pass --data-dir or set NETMEND_DATA")
    for n in names:
        p = data_dir / n
        if p.exists():
            return p
    raise NetmendError(f"{what}: none of {names} found under {data_dir}")


# ----------------------------------------------------------------------------- raw formats

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or plain): magic 0x0000 type ndim, big-endian sizes, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise NetmendError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise NetmendError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise NetmendError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise NetmendError(f"{path}: truncated IDX file ({data.size} values for shape {dims})")
    return data.reshape(dims)


def read_pixel_csv(path: str | os.PathLike, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The mnist_5k CSV: one row per image, side² pixel columns (0–255) then the label."""
    import warnings
    import zlib

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")          # numpy warns (and goes on) about an empty file
            arr = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise NetmendError(f"cannot read pixel CSV {path}: {first_line(exc)}") from None
    if arr.size == 0:
        raise NetmendError(f"{path}: no rows (expected one image per line: {side * side} pixels then the label)")
    if arr.shape[1] != side * side + 1:
        raise NetmendError(f"{path}: expected {side * side + 1} columns (pixels then label), got {arr.shape[-1]}")
    pixels, labels = arr[:, :-1], arr[:, -1]
    bad = ~np.isfinite(pixels) | (pixels < 0) | (pixels > 255) | (pixels != np.round(pixels))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise NetmendError(f"{path}: line {i + 1}, pixel {j}: {pixels[i, j]:g} is not a whole number in 0..255")
    if not np.isfinite(labels).all() or (labels < 0).any() or (labels != np.round(labels)).any():
        i = int(np.argwhere(~np.isfinite(labels) | (labels < 0) | (labels != np.round(labels)))[0][0])
        raise NetmendError(f"{path}: line {i + 1}: label {labels[i]:g} is not a class index (a whole number ≥ 0)")
    return pixels.reshape(-1, side, side).astype(np.uint8), labels.astype(np.int64)


def decode_image(data: bytes) -> np.ndarray:
    """An image file's bytes as H×W×3 uint8. Its size is read from the header first: an image declaring more
    than MAX_IMAGE_PIXELS is refused (ValueError) before anything is decoded, never a decompression bomb."""
    import warnings

    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{len(data):,} bytes, more than netmend's limit of {MAX_IMAGE_BYTES:,} per image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f"it declares {w}×{h} pixels, more than netmend's limit of {MAX_IMAGE_PIXELS:,} "
                                     f"per image")
                return np.asarray(im.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"it declares more pixels than netmend's limit of {MAX_IMAGE_PIXELS:,} per image "
                             f"({first_line(exc)[:80]})") from None
        except (SyntaxError, struct.error, EOFError, MemoryError) as exc:  # PIL's plugins raise these on bad headers
            raise ValueError(first_line(exc)) from None


def read_class_folders(root: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Images under root/[split/]<class>/<file>, from a folder or a .tar.gz of one.

    Returns {split: (images N×H×W×3 uint8, labels, class names)}; split is 'train'/'test' when the
    tree has them, else 'all'."""
    import zlib

    root = Path(root)
    items: list[tuple[tuple[str, ...], bytes]] = []
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(root) as tar:
                for m in tar:
                    if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES):
                        if m.size > MAX_IMAGE_BYTES:
                            raise NetmendError(f"{root}: {m.name} is {m.size:,} bytes, more than netmend's limit of "
                                               f"{MAX_IMAGE_BYTES:,} per image")
                        items.append((Path(m.name).parts, tar.extractfile(m).read()))
        except tarfile.ReadError as exc:
            why = "not a tar / tar.gz archive, or a corrupt one" if "\n" in str(exc) or "opened" in str(exc) \
                else first_line(exc)
            raise NetmendError(f"cannot read image archive {root}: {why}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise NetmendError(f"cannot read image archive {root}: {first_line(exc)}") from None
    elif root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                try:
                    if p.stat().st_size > MAX_IMAGE_BYTES:
                        raise NetmendError(f"{p} is {p.stat().st_size:,} bytes, more than netmend's limit of "
                                           f"{MAX_IMAGE_BYTES:,} per image")
                    items.append((p.relative_to(root).parts, p.read_bytes()))
                except OSError as exc:
                    raise NetmendError(f"cannot read {p}: {first_line(exc)}") from None
    else:
        raise NetmendError(f"{root} is neither an image folder nor a .tar.gz of class folders")
    if not items:
        raise NetmendError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    groups: dict[str, list[tuple[str, bytes, str]]] = {}
    for parts, data in items:
        if len(parts) < 2:
            raise NetmendError(f"{root}: {'/'.join(parts)} is not inside a class folder (<class>/<image>)")
        split = next((s for s in ("train", "test") if s in parts[:-2]), "all")
        groups.setdefault(split, []).append((parts[-2], data, "/".join(parts)))
    classes = sorted({c for g in groups.values() for c, _, _ in g})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, g in groups.items():
        g.sort(key=lambda t: t[0])
        decoded = []
        for _, d, name in g:
            try:
                decoded.append(decode_image(d))
            except (OSError, ValueError) as exc:
                raise NetmendError(f"cannot decode {name} in {root}: {first_line(exc)}") from None
        shapes = sorted({a.shape for a in decoded})
        if len(shapes) > 1:
            raise NetmendError(f"{root}: images of different sizes ({shapes[0][1]}×{shapes[0][0]} and "
                               f"{shapes[1][1]}×{shapes[1][0]}); give images of one size")
        out[split] = (np.stack(decoded), np.array([index[c] for c, _, _ in g], dtype=np.int64), classes)
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("NETMEND_CACHE", Path.home() / ".cache" / "netmend"))


def _cached(key_path: Path, tag: str, build):
    """Cache decoded arrays as .npz keyed by the source file's size and mtime."""
    st = key_path.stat()
    key = hashlib.sha1(f"{key_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tag}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"{tag}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            pass
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
    return arrays


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, copy=True)).float().div_(255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- registered datasets

@DATASETS.register("digits", "scikit-learn's bundled 8×8 handwritten digits (1,797 images); embedded, no download")
def load_digits_data(data_dir=None) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    n_test = 450
    te, tr = perm[:n_test], perm[n_test:]
    return ImageData("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)], "sklearn.datasets.load_digits",
                     {"test_split_seed": 0, "n_test": n_test})


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    imgs = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not imgs.exists():
        imgs = folder / f"{prefix}-images-idx3-ubyte"
        labels = folder / f"{prefix}-labels-idx1-ubyte"
    if not imgs.exists() or not labels.exists():
        raise NetmendError(f"{folder}: missing {prefix}-images/labels IDX files")
    x, y = read_idx(imgs), read_idx(labels).astype(np.int64)
    if x.ndim != 3 or len(x) != len(y):
        raise NetmendError(f"{folder}: {prefix} images {x.shape} and labels {y.shape} do not match")
    return x, y


def _idx_dataset(name: str, folder_names: list[str], classes: list[str], data_dir) -> ImageData:
    folder = find_file(resolve_data_dir(data_dir), folder_names, name)
    xtr, ytr = _idx_pair(folder, "train")
    xte, yte = _idx_pair(folder, "t10k")
    return ImageData(name, _to_tensor(xtr), torch.from_numpy(ytr), _to_tensor(xte), torch.from_numpy(yte), classes, str(folder))


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@DATASETS.register("fashion-mnist", "Fashion-MNIST, 60k train + 10k test, IDX gz files")
def load_fashion_mnist(data_dir=None) -> ImageData:
    return _idx_dataset("fashion-mnist", ["images/fashion-mnist", "fashion-mnist", "."], FASHION, data_dir)


@DATASETS.register("mnist", "MNIST, 60k train + 10k test, IDX gz files (needs the training images)")
def load_mnist(data_dir=None) -> ImageData:
    return _idx_dataset("mnist", ["images/mnist", "mnist", "."], [str(i) for i in range(10)], data_dir)


@DATASETS.register("mnist-5k", "5,000 MNIST training digits (CSV) + the 10k MNIST test set (IDX)")
def load_mnist_5k(data_dir=None) -> ImageData:
    root = resolve_data_dir(data_dir)
    csv = find_file(root, ["images/mnist/mnist_5k.csv.gz", "mnist/mnist_5k.csv.gz", "mnist_5k.csv.gz", "mnist_5k.csv"], "mnist-5k")
    arrays = _cached(csv, "mnist5k", lambda: dict(zip(("x", "y"), read_pixel_csv(csv))))
    xte, yte = _idx_pair(csv.parent, "t10k")
    return ImageData("mnist-5k", _to_tensor(arrays["x"]), torch.from_numpy(arrays["y"]).long(), _to_tensor(xte),
                     torch.from_numpy(yte), [str(i) for i in range(10)], str(csv))


def _folder_dataset(name: str, path: Path) -> ImageData:
    def build():
        groups = read_class_folders(path)
        if set(groups) != {"train", "test"}:
            raise NetmendError(f"{path}: expected train/ and test/ class folders, found {sorted(groups)}")
        (xtr, ytr, cls), (xte, yte, _) = groups["train"], groups["test"]
        return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "classes": np.array(cls)}

    a = _cached(path, name, build) if path.is_file() else build()
    return ImageData(name, _to_tensor(a["xtr"]), torch.from_numpy(a["ytr"]).long(), _to_tensor(a["xte"]),
                     torch.from_numpy(a["yte"]).long(), [str(c) for c in a["classes"]], str(path))


@DATASETS.register("cifar10", "CIFAR-10 from the JPEG copy (tar.gz or folder of train/test class folders)")
def load_cifar10(data_dir=None) -> ImageData:
    path = find_file(resolve_data_dir(data_dir), ["images/cifar10-jpeg.tar.gz", "cifar10-jpeg.tar.gz", "cifar10", "images/cifar10"], "cifar10")
    return _folder_dataset("cifar10", path)


@DATASETS.register("image-folder", "any train/<class>/ and test/<class>/ image tree (or its .tar.gz), given by --data-dir")
def load_image_folder(data_dir=None) -> ImageData:
    if not data_dir:
        raise NetmendError("image-folder needs --data-dir pointing at a folder or .tar.gz of train/test class folders")
    path = Path(data_dir)
    if not path.exists():
        raise NetmendError(f"image folder not found: {path}")
    return _folder_dataset("image-folder", path)


def load_dataset(name: str, data_dir=None) -> ImageData:
    return DATASETS.get(name)(data_dir=data_dir)


# ----------------------------------------------------------------------------- splits

def split_indices(n_train: int, seed: int, pool_fraction: float = 0.1) -> dict[str, list[int]]:
    """Seeded split of the training files into `train` (used to train) and `repair_pool` (held out,
    clean; the only data repair methods may draw from). The test files are the evaluation data."""
    if n_train < 10:
        raise NetmendError(f"dataset too small to split ({n_train} training samples)")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_train, generator=g).tolist()
    n_pool = max(1, int(round(pool_fraction * n_train)))
    return {"repair_pool": sorted(perm[:n_pool]), "train": sorted(perm[n_pool:])}
