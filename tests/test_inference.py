"""The fast no-gradient pass for Linear/ReLU chains (netmend/inference.py): the model's own numbers, and no fast
path where it would not be the model's pass."""
from __future__ import annotations

import torch
from torch import nn

from netmend.inference import CHAIN_ROWS, chain_forward


def _chain(seed: int, widths=(5, 50, 50, 50, 5)) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1]).eval()


def test_chain_forward_gives_the_models_outputs_across_row_blocks():
    for seed in range(3):
        model = _chain(seed)
        x = torch.randn(2 * CHAIN_ROWS + 123, 5)          # three row blocks, the last one short
        with torch.no_grad():
            want = model(x)
        got = chain_forward(model)(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_chain_forward_reads_the_live_weights():
    model = _chain(0)
    fast = chain_forward(model)
    x = torch.randn(64, 5)
    with torch.no_grad():
        model[0].weight.add_(0.5)                         # a training step moves the weights in place
        want = model(x)
    assert torch.allclose(fast(x), want, atol=1e-6)


def test_no_fast_path_for_other_models_or_hooked_ones():
    assert chain_forward(nn.Sequential(nn.ReLU(), nn.Linear(3, 2))) is None          # must start with a Linear
    assert chain_forward(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))) is None
    assert chain_forward(nn.Linear(3, 2)) is None

    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    assert chain_forward(Custom(nn.Linear(3, 2))) is None
    model = _chain(1)
    handle = model[2].register_forward_hook(lambda *_: None)
    assert chain_forward(model) is None
    handle.remove()
    assert chain_forward(model) is not None
