"""Rank-one editing: closed form exactness, span of ΔW, reversibility, numerical guards, clear errors."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from netmend.defects.base import Defect, Pairs, RepairData
from netmend.errors import NetmendError
from netmend.hooks import capture
from netmend.editing import second_moment, shared_direction, solve
from netmend.repair.rank_one import RankOneConfig, rank_one_edit


class ToyDefect(Defect):
    kind = "toy"

    def __init__(self, x_fit, corrupted, clean, masks=None):
        n = len(x_fit)
        self.repair = RepairData(x_fit, torch.zeros(n, dtype=torch.long), x_fit[:4], torch.zeros(4, dtype=torch.long))
        self.pairs = Pairs(corrupted, clean, torch.zeros(len(clean), dtype=torch.long), masks)

    def metrics(self, model):
        return {}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(6, 8)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(8, 3))])).double().eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("conv1", nn.Conv2d(2, 4, 3, padding=1)), ("relu1", nn.ReLU()),
                                      ("conv2", nn.Conv2d(4, 5, 3, padding=1)), ("relu2", nn.ReLU()),
                                      ("flatten", nn.Flatten()), ("fc", nn.Linear(5 * 6 * 6, 3))])).double().eval()


def keys_values(model, layer, x):
    with torch.no_grad(), capture(model, layer) as cap:
        model(x)
    return cap.inputs[layer], cap.outputs[layer]


def test_closed_form_exact_and_rank_one_along_d():
    model = mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    bad, good = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
    defect = ToyDefect(x, bad, good)
    edit = rank_one_edit(model, defect, "fc2", RankOneConfig(clamp=1e9, protect_clean=False))
    k_star, _ = keys_values(model, "fc2", bad)
    _, v_clean = keys_values(model, "fc2", good)
    edit.apply(model)
    _, v_new = keys_values(model, "fc2", bad)
    assert torch.allclose(v_new, v_clean, atol=1e-5, rtol=0)            # W'k* = v*
    dW = edit.deltas["fc2.weight"]
    assert torch.linalg.matrix_rank(dW) == 1
    d = torch.tensor(edit.meta["d"], dtype=torch.float64)
    d = d / d.norm()
    assert torch.allclose(dW, dW @ torch.outer(d, d), atol=1e-10)       # rows of ΔW lie along d
    # d = C⁻¹k* (up to the ridge)
    C, _ = second_moment(mlp(), "fc2", torch.cat([x, bad]))
    d_ref, _ = solve(C, k_star[0])
    assert torch.allclose(d, d_ref / d_ref.norm(), atol=1e-6)


def test_revert_restores_bit_for_bit():
    model = cnn()
    x = torch.rand(20, 2, 6, 6, dtype=torch.float64)
    clean = x[:2].clone()
    bad = clean.clone()
    bad[:, :, 4:, 4:] = 1.0
    masks = torch.zeros(2, 6, 6)
    masks[:, 4:, 4:] = 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = rank_one_edit(model, ToyDefect(x, bad, clean, masks), "conv2", RankOneConfig())
    edit.apply(model)
    assert not torch.equal(model.conv2.weight, before["conv2.weight"])
    edit.revert(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_conv_edit_moves_only_along_input_channel_direction_and_reduces_residual():
    model = cnn()
    x = torch.rand(30, 2, 6, 6, dtype=torch.float64)
    clean = x[:3].clone()
    bad = clean.clone()
    bad[:, :, 4:, 4:] = 1.0
    masks = torch.zeros(3, 6, 6)
    masks[:, 4:, 4:] = 1
    defect = ToyDefect(x, bad, clean, masks)
    _, v_bad = keys_values(model, "conv2", bad)
    _, v_cln = keys_values(model, "conv2", clean)
    edit = rank_one_edit(model, defect, "conv2", RankOneConfig(clamp=1e9))
    dW = edit.deltas["conv2.weight"]                     # (o, i, kh, kw)
    d = torch.tensor(edit.meta["d"], dtype=torch.float64)
    d = d / d.norm()
    proj = torch.einsum("oiyx,i,j->ojyx", dW, d, d)
    assert torch.allclose(dW, proj, atol=1e-10)
    edit.apply(model)
    _, v_new = keys_values(model, "conv2", bad)
    assert (v_new - v_cln).norm() < (v_bad - v_cln).norm()          # least squares: never worse


def test_projected_fit_keeps_delta_in_span_of_d():
    model = cnn()
    x = torch.rand(30, 2, 6, 6, dtype=torch.float64)
    clean = x[:2].clone()
    bad = clean.clone()
    bad[:, :, 4:, 4:] = 1.0
    defect = ToyDefect(x, bad, clean)
    _, v_bad = keys_values(model, "relu2", bad)
    _, v_cln = keys_values(model, "relu2", clean)
    edit = rank_one_edit(model, defect, "conv2", RankOneConfig(clamp=1e9, steps=100, mask_keys=False), value="relu2")
    assert edit.meta["fit_steps"] > 0
    dW = edit.deltas["conv2.weight"]
    d = torch.tensor(edit.meta["d"], dtype=torch.float64)
    d = d / d.norm()
    assert torch.allclose(dW, torch.einsum("oiyx,i,j->ojyx", dW, d, d), atol=1e-8)
    edit.apply(model)
    _, v_new = keys_values(model, "relu2", bad)
    assert (v_new - v_cln).abs().sum() < (v_bad - v_cln).abs().sum()


def test_several_pairs_shared_direction_and_rank_r():
    model = mlp()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    bad, good = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    defect = ToyDefect(x, bad, good)
    shared = rank_one_edit(model, defect, "fc2", RankOneConfig(clamp=1e9))
    assert torch.linalg.matrix_rank(shared.deltas["fc2.weight"]) == 1
    hard = rank_one_edit(model, defect, "fc2", RankOneConfig(clamp=1e9, mode="rank-r", mu=1e-12))
    _, v_cln = keys_values(model, "fc2", good)
    hard.apply(model)
    _, v_new = keys_values(model, "fc2", bad)
    assert torch.allclose(v_new, v_cln, atol=1e-5)                      # all three pairs exactly
    assert torch.linalg.matrix_rank(hard.deltas["fc2.weight"]) == 3


def test_single_key_shared_direction_is_c_inverse_k():
    C = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    k = torch.tensor([1.0, -1.0], dtype=torch.float64)
    d, _ = shared_direction(C, torch.stack([k, k]), rho=0.0 + 1e-12)
    ref = torch.linalg.solve(C, k)
    assert torch.allclose(d, ref / ref.norm(), atol=1e-8)


def test_norm_clamp_logged():
    model = mlp()
    x = torch.randn(100, 6, dtype=torch.float64)
    edit = rank_one_edit(model, ToyDefect(x, 50 * torch.ones(1, 6, dtype=torch.float64), -50 * torch.ones(1, 6, dtype=torch.float64)),
                         "fc2", RankOneConfig(clamp=1e-3))
    assert edit.meta["clamped"] and edit.meta["relative_norm"] == pytest.approx(1e-3)
    w = model.fc2.weight.detach().norm()
    assert float(edit.deltas["fc2.weight"].norm() / w) == pytest.approx(1e-3, rel=1e-4)


def test_singular_moment_uses_ridge_fallback():
    # keys confined to a 2-d subspace of R^6: C is singular; the ridge makes the solve well-posed
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(6, 2))])).double()
    x = torch.zeros(50, 6, dtype=torch.float64)
    x[:, :2] = torch.randn(50, 2, dtype=torch.float64)
    bad, good = torch.zeros(1, 6, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64)
    bad[0, 0], good[0, 1] = 1.0, 1.0
    edit = rank_one_edit(model, ToyDefect(x, bad, good), "fc", RankOneConfig(clamp=1e9))
    assert edit.meta["ridge"] > 0 and edit.meta["condition"] > 1e3
    assert torch.isfinite(edit.deltas["fc.weight"]).all()


def test_all_zero_keys_is_a_clear_error():
    model = nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("fc", nn.Linear(4, 2))])).double()
    x = -torch.rand(20, 4, dtype=torch.float64)                        # ReLU kills everything: C = 0
    with pytest.raises(NetmendError, match="second moment is zero"):
        rank_one_edit(model, ToyDefect(x, x[:1], x[1:2]), "fc", RankOneConfig())


def test_bad_inputs_are_clear_errors():
    model = mlp()
    x = torch.randn(20, 6, dtype=torch.float64)
    defect = ToyDefect(x, x[:1], x[1:2])
    with pytest.raises(NetmendError, match="does not exist"):
        rank_one_edit(model, defect, "fc9", RankOneConfig())
    with pytest.raises(NetmendError, match="Linear or Conv2d"):
        rank_one_edit(model, defect, "relu1", RankOneConfig())
    wrong = ToyDefect(x, torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64))
    with pytest.raises(NetmendError, match="shape"):
        rank_one_edit(model, wrong, "fc2", RankOneConfig())
    depthwise = nn.Sequential(OrderedDict([("conv", nn.Conv2d(2, 2, 3, groups=2))])).double()
    img = torch.rand(4, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(NetmendError, match="groups"):
        rank_one_edit(depthwise, ToyDefect(img, img[:1], img[1:2]), "conv", RankOneConfig())


def test_protected_edit_keeps_the_clean_twin_and_stays_rank_one():
    model = mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    bad, good = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
    _, v_clean = keys_values(model, "fc2", good)
    edit = rank_one_edit(model, ToyDefect(x, bad, good), "fc2", RankOneConfig(clamp=1e9, protect_clean=True))
    assert edit.meta["protected"] == 1
    edit.apply(model)
    assert torch.allclose(keys_values(model, "fc2", bad)[1], v_clean, atol=1e-5)     # W'k̃ = v*
    assert torch.allclose(keys_values(model, "fc2", good)[1], v_clean, atol=1e-5)    # W'k_c = W k_c
    assert torch.linalg.matrix_rank(edit.deltas["fc2.weight"]) == 1


def test_moment_cache_is_keyed_by_content_not_by_tensor_identity():
    """Callers rebuild the statistics tensor on every call: equal content hits the cache, other content of the
    same shape never gets a stale C, and an edit upstream invalidates it."""
    from netmend.editing import cached_moment

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 6)), ("relu", nn.ReLU()), ("fc2", nn.Linear(6, 3))]))
    x = torch.randn(50, 4)
    c1 = cached_moment(model, "fc2", x.clone())
    assert cached_moment(model, "fc2", x.clone()) is c1
    y = torch.randn(50, 4)
    assert torch.allclose(cached_moment(model, "fc2", y), second_moment(model, "fc2", y)[0])
    with torch.no_grad():
        model.fc1.weight.mul_(2)
    assert torch.allclose(cached_moment(model, "fc2", x.clone()), second_moment(model, "fc2", x)[0])


def test_moment_cache_hits_again_after_an_upstream_edit_is_reverted():
    """Dynamic rectification tries edits and reverts them to the exact weights: the moments downstream are
    valid again and must not be recomputed (they were, with a version-counter fingerprint: half its time)."""
    from netmend.edit import Edit
    from netmend.editing import cached_moment

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 6)), ("relu", nn.ReLU()), ("fc2", nn.Linear(6, 3))]))
    x = torch.randn(50, 4)
    c1 = cached_moment(model, "fc2", x)
    edit = Edit({"fc1.weight": torch.randn(6, 4)}, {})
    edit.apply(model)                        # an edit tried upstream and measured ...
    assert not torch.allclose(second_moment(model, "fc2", x)[0], c1)
    edit.revert(model)                       # ... then taken back: the weights are the same bytes again
    assert cached_moment(model, "fc2", x) is c1
    edit.apply(model)                        # kept this time: the moment is stale and recomputed
    c2 = cached_moment(model, "fc2", x)
    assert c2 is not c1 and torch.allclose(c2, second_moment(model, "fc2", x)[0])


def test_prefetched_and_shared_moments_are_the_tensors_second_moment_computes():
    """One pass fills every layer's C (the same batches, the same sums: equal bit for bit to a pass per layer),
    and a deep copy of the model gets them without another pass while its upstream weights are the same bytes."""
    import copy

    from netmend.editing import cached_moment, prefetch_moments, share_moments

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 6)), ("relu", nn.ReLU()), ("fc2", nn.Linear(6, 5)),
                                       ("relu2", nn.ReLU()), ("fc3", nn.Linear(5, 3))]))
    x = torch.randn(300, 4)
    prefetch_moments(model, ["fc2", "fc3"], x, batch_size=64)
    for layer in ("fc2", "fc3"):
        assert torch.equal(cached_moment(model, layer, x, batch_size=64), second_moment(model, layer, x, 64)[0])
    twin = copy.deepcopy(model)
    assert share_moments(model, twin) == 2
    assert cached_moment(twin, "fc3", x, batch_size=64) is cached_moment(model, "fc3", x, batch_size=64)
    with torch.no_grad():
        twin.fc1.weight.add_(1.0)                      # the copy's upstream changes: its moments are its own again
    assert torch.equal(cached_moment(twin, "fc3", x, batch_size=64), second_moment(twin, "fc3", x, 64)[0])
    assert not torch.equal(cached_moment(twin, "fc3", x, batch_size=64), cached_moment(model, "fc3", x, batch_size=64))


def test_few_keys_are_solved_through_their_gram_matrix_with_the_dense_answer():
    """Fewer keys than the width: C is held as its keys and C + εI is solved by Woodbury through them, with the
    answer of the dense Cholesky solve, and the condition number of the dense matrix."""
    from netmend.editing import cached_moment, condition, dense, moment_keys, ridge

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("flat", nn.Flatten()), ("fc", nn.Linear(120, 7))])).eval()
    x = torch.randn(40, 1, 10, 12)
    C = cached_moment(model, "fc", x)
    X = moment_keys(C)
    assert X is not None and X.shape == (40, 120)
    b = torch.randn(120, 3, dtype=torch.float64)
    got, info = solve(C, b, 1e-3)
    assert info["solver"] == "woodbury"
    A = dense(C) + ridge(C, 1e-3) * torch.eye(120, dtype=torch.float64)
    assert torch.allclose(got, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10 * float(b.abs().max()))
    assert condition(C, info["ridge"]) == pytest.approx(float(torch.linalg.cond(A)), rel=1e-6)
    many = torch.randn(200, 1, 10, 12)                   # more keys than the width: the dense factor
    C2 = cached_moment(model, "fc", many)
    assert moment_keys(C2) is None and solve(C2, b, 1e-3)[1]["solver"] == "cholesky"


def test_a_moment_held_as_its_keys_is_the_dense_moment():
    """Between half the width and the width (Fashion-MNIST's fc1: 2 401 keys of width 3 136) C is held as its keys:
    its dense form equals second_moment's sums, a prefetched layer gets it too, and solves, directions and the
    ridge agree with the dense matrix's to rounding."""
    from netmend.editing import KeyMoment, cached_moment, dense, prefetch_moments, ridge, shared_direction

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("flat", nn.Flatten()), ("fc", nn.Linear(120, 9)), ("relu", nn.ReLU()),
                                       ("out", nn.Linear(9, 4))])).eval()
    x = torch.randn(90, 1, 10, 12)
    prefetch_moments(model, ["fc", "out"], x, batch_size=32)
    C = cached_moment(model, "fc", x, batch_size=32)
    assert isinstance(C, KeyMoment) and C.count == 90 and C.shape == (120, 120)
    D, count = second_moment(model, "fc", x, 32)
    assert isinstance(D, torch.Tensor) and count == 90
    assert torch.allclose(dense(C), D, rtol=1e-12, atol=1e-14)
    assert not isinstance(cached_moment(model, "out", x, batch_size=32), KeyMoment)    # 90 keys of width 9
    assert ridge(C, 1e-3) == pytest.approx(ridge(D, 1e-3), rel=1e-12)
    b = torch.randn(120, dtype=torch.float64)
    assert torch.allclose(solve(C, b, 1e-3)[0], solve(D, b, 1e-3)[0], rtol=1e-7, atol=1e-9 * float(b.abs().max()))
    keys, protect = torch.randn(3, 120), torch.randn(2, 120)
    d1, _ = shared_direction(C, keys, rho=1e-3, protect=protect)
    d2, _ = shared_direction(D, keys, rho=1e-3, protect=protect)
    assert torch.allclose(d1, d2, atol=1e-7)


def test_the_keys_gram_matrix_in_strips_is_the_full_product():
    """From GRAM_BLOCKED keys on, XXᵀ is filled below the diagonal strip by strip and mirrored: symmetric, and the
    full product up to rounding."""
    from netmend.editing import GRAM_BLOCKED, _gram_rows

    X = torch.randn(GRAM_BLOCKED + 77, 40, dtype=torch.float64)
    M = _gram_rows(X)
    assert torch.equal(M, M.T)
    assert torch.allclose(M, X @ X.T, rtol=1e-12, atol=1e-12)
