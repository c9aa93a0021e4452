"""BlockMNIST (Shah, Jain, Netrapalli, NeurIPS 2021): a feature-leakage test bed.

Each image stacks two 28×28 blocks vertically (56×28): the MNIST digit block and a *null* block
that carries the same fixed pattern for every class, so it holds no information about the label.
Which block is on top is drawn per image (seeded) and kept as metadata, so a metric can ask how
much of an explanation lands on the null block (feature leakage) and a repair can be given the
image with its null block blanked (the cleansed twin).

`ImageData.info` of the registered `blockmnist` dataset holds `digit_top_train` / `digit_top_test`
(bool tensors: True = the digit block is the top half), the seed and the null pattern's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NetmendError, require
from ..registry import DATASETS
from .datasets import ImageData, load_dataset

BLOCK = 28


def null_block(kind: str = "square", size: int = BLOCK) -> torch.Tensor:
    """The class-independent pattern of the null block (1×size×size in [0, 1]).

    square: Shah et al.'s choice, a centred bright square outline (a stroke-like shape, so a
    convolutional model responds to it as it does to digit strokes); blank: all zeros."""
    out = torch.zeros(1, size, size)
    if kind == "square":
        lo, hi, w = size // 4, size - size // 4, 3
        out[:, lo:hi, lo:hi] = 1.0
        out[:, lo + w: hi - w, lo + w: hi - w] = 0.0
    elif kind != "blank":
        raise NetmendError(f"unknown null block {kind!r}; use square or blank")
    return out


@dataclass
class BlockLayout:
    """Where the blocks are: `digit_top[i]` True when image i has its digit in rows 0..27."""

    digit_top: torch.Tensor

    def masks(self, size: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit mask, null mask), each N×(2·size)×size in {0, 1}."""
        top = torch.zeros(len(self.digit_top), 2 * size, size)
        top[:, :size] = 1.0
        t = self.digit_top.view(-1, 1, 1)
        digit = torch.where(t, top, 1 - top)
        return digit, 1 - digit


def stack_blocks(digits: torch.Tensor, digit_top: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """N×1×28×28 digits → N×1×56×28 BlockMNIST images (batched, no loop)."""
    require(digits.dim() == 4 and tuple(digits.shape[1:]) == tuple(null.shape),
            f"BlockMNIST needs N×{tuple(null.shape)} digits, got {tuple(digits.shape)}")
    nul = null.to(digits.dtype).expand_as(digits)
    t = digit_top.view(-1, 1, 1, 1)
    top = torch.where(t, digits, nul)
    bottom = torch.where(t, nul, digits)
    return torch.cat([top, bottom], dim=2)


def draw_positions(n: int, seed: int) -> torch.Tensor:
    """Seeded digit positions: True = digit on top (probability ½ each)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed))) < 0.5


def blank_null(x: torch.Tensor, digit_top: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The cleansed twin: the null block replaced by a constant (`fill`) block; the digit block kept."""
    _, null_mask = BlockLayout(digit_top).masks(x.shape[-1])
    m = null_mask.unsqueeze(1).to(x.dtype)
    return x * (1 - m) + fill * m


def swap_blocks(x: torch.Tensor) -> torch.Tensor:
    """The same BlockMNIST images in the other layout: top and bottom blocks exchanged (N×C×2s×s)."""
    s = x.shape[-1]
    require(x.shape[-2] == 2 * s, f"BlockMNIST images are 2s×s, got {tuple(x.shape[-2:])}")
    return torch.cat([x[..., s:, :], x[..., :s, :]], dim=-2)


def make_blockmnist(base: ImageData, seed: int = 0, null: str = "square") -> ImageData:
    """BlockMNIST from any 28×28 single-channel digit set (train and test positions drawn separately)."""
    require(base.in_shape == [1, BLOCK, BLOCK], f"BlockMNIST needs 1×28×28 digits, {base.name} has {base.in_shape}")
    pattern = null_block(null)
    top_tr = draw_positions(len(base.y_train), seed)
    top_te = draw_positions(len(base.y_test), seed + 1)
    info = {"digit_top_train": top_tr, "digit_top_test": top_te, "seed": int(seed), "null": null,
            "base": base.name, "layout": "56×28: digit block and null block stacked vertically"}
    return ImageData("blockmnist", stack_blocks(base.x_train, top_tr, pattern), base.y_train.clone(),
                     stack_blocks(base.x_test, top_te, pattern), base.y_test.clone(), list(base.classes),
                     base.source, info)


@DATASETS.register("blockmnist", "BlockMNIST (56×28): mnist-5k digits stacked with a null square block, seed 0")
def load_blockmnist(data_dir=None) -> ImageData:
    return make_blockmnist(load_dataset("mnist-5k", data_dir), seed=0, null="square")
