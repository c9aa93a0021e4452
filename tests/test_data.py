import gzip
import io
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from netmend.data.datasets import load_dataset, read_class_folders, read_idx, read_pixel_csv, split_indices
from netmend.errors import NetmendError


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_round_trip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    with gzip.open(tmp_path / "t.gz", "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(NetmendError, match="truncated"):
        read_idx(tmp_path / "t.gz")
    (tmp_path / "csv.gz").write_bytes(gzip.compress(b"1,2,3\n"))
    with pytest.raises(NetmendError, match="not an IDX"):
        read_idx(tmp_path / "csv.gz")


def test_pixel_csv(tmp_path):
    rows = np.random.default_rng(0).integers(0, 255, size=(3, 16))
    rows = np.concatenate([rows, np.array([[1], [2], [3]])], 1)
    np.savetxt(tmp_path / "p.csv", rows, delimiter=",", fmt="%d")
    x, y = read_pixel_csv(tmp_path / "p.csv", side=4)
    assert x.shape == (3, 4, 4) and y.tolist() == [1, 2, 3]
    with pytest.raises(NetmendError, match="columns"):
        read_pixel_csv(tmp_path / "p.csv", side=5)


def test_class_folders_from_tar_gz(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "test"):
            for cls, val in (("cat", 10), ("dog", 200)):
                img = io.BytesIO()
                Image.fromarray(np.full((4, 4, 3), val, np.uint8)).save(img, format="PNG")
                info = tarfile.TarInfo(f"data/{split}/{cls}/0.png")
                info.size = len(img.getvalue())
                tar.addfile(info, io.BytesIO(img.getvalue()))
    (tmp_path / "d.tar.gz").write_bytes(buf.getvalue())
    groups = read_class_folders(tmp_path / "d.tar.gz")
    imgs, labels, classes = groups["train"]
    assert classes == ["cat", "dog"] and imgs.shape == (2, 4, 4, 3) and labels.tolist() == [0, 1]
    data = load_dataset("image-folder", tmp_path / "d.tar.gz")
    assert data.x_train.shape == (2, 3, 4, 4) and float(data.x_train.max()) <= 1.0


def test_wrong_data_path_format_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NetmendError):
        load_dataset("image-folder", tmp_path / "notes.txt")
    with pytest.raises(NetmendError, match="not found"):
        load_dataset("fashion-mnist", tmp_path / "missing")
    with pytest.raises(NetmendError, match="unknown dataset"):
        load_dataset("imagenet-22k")


def test_digits_embedded_and_splits_are_seeded(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.num_classes == 10
    a, b = split_indices(1000, 3), split_indices(1000, 3)
    assert a == b and not set(a["train"]) & set(a["repair_pool"]) and len(a["repair_pool"]) == 100


def test_fashion_mnist_loads_from_shared_data(shared_data):
    d = load_dataset("fashion-mnist", shared_data)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_test).tolist() == [1000] * 10
