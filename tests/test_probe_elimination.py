"""Issue 25's speed-ups that must not change what is chosen: successive elimination of probe candidates
(hypergeometric count bounds, per-sample cost terms) and the channels-last inference layout."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netmend.api import defect_for


def _hyper_tail(K: int, k: int, m: int, total: int, at_most: bool) -> float:
    xs = range(0, k + 1) if at_most else range(k, m + 1)
    return sum(math.comb(K, x) * math.comb(total - K, m - x) for x in xs if x <= K and m - x <= total - K) \
        / math.comb(total, m)


@pytest.mark.parametrize("k,m,total", [(0, 10, 40), (3, 10, 40), (10, 10, 40), (7, 25, 40), (0, 39, 40)])
def test_count_bounds_are_the_exact_hypergeometric_limits(k, m, total):
    """hi is the most marked items that still make seeing ≤ k as likely as δ, lo the fewest that make ≥ k as
    likely: checked against exact binomial-coefficient tails, both at the bound and one past it."""
    from netmend.repair.rectify import count_bounds

    delta = 0.01
    lo, hi = count_bounds(k, m, total, delta)
    assert k <= lo <= hi <= total - (m - k)
    assert _hyper_tail(hi, k, m, total, at_most=True) >= delta
    assert hi == total - (m - k) or _hyper_tail(hi + 1, k, m, total, at_most=True) < delta
    assert _hyper_tail(lo, k, m, total, at_most=False) >= delta
    assert lo == k or _hyper_tail(lo - 1, k, m, total, at_most=False) < delta


def test_count_bounds_when_everything_was_seen():
    from netmend.repair.rectify import count_bounds

    assert count_bounds(4, 50, 50) == (4, 4)


@pytest.mark.parametrize("cost", ["pull", "stamped", "flip"])
def test_cost_terms_sum_to_the_probe_cost(cost):
    """The per-sample decomposition the eliminations bound is the probe cost itself, for every cost."""
    from netmend.repair.rectify import PROBE_COSTS, _rates, cost_terms

    g = torch.Generator().manual_seed(1)
    y, pc, pb = (torch.randint(0, 4, (500,), generator=g) for _ in range(3))
    pulled = 2
    n_other = int((y != pulled).sum())
    terms = cost_terms(cost, pc, pb, y, pulled, n_other)
    assert sum(w * float(t.double().mean()) for w, t in terms) == pytest.approx(
        PROBE_COSTS[cost](_rates(pc, pb, y, pulled)), abs=1e-6)   # _rates: float32 means


def test_elimination_keeps_the_choice_and_marks_what_it_stopped(backdoored):
    """With the judge, the (edit, γ) the whole probe chooses is still measured on the whole probe with the same
    rates; a clearly worse candidate stops early and says on how many samples it was measured."""
    from netmend.edit import Edit
    from netmend.repair.rectify import PROBE_COSTS, RectifyConfig, make_probe, probe_rates_many

    model, info = backdoored
    defect = defect_for(info, pairs=1, repair_fraction=0.1)
    probe = make_probe(model, defect, RectifyConfig())
    n = len(probe.pairs)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    names = [k for k in params if k.endswith("weight")][-2:]
    edits = [Edit({name: 0.02 * torch.randn(params[name].shape, generator=g)}) for name in names]
    edits.append(Edit({names[-1]: 5.0 * torch.randn(params[names[-1]].shape, generator=g)}))   # a harmful one
    gammas = [1.0, 2.0]
    full, base = probe_rates_many(model, edits, gammas, probe, batch_size=64, with_base=True)
    judged, base2 = probe_rates_many(model, edits, gammas, probe, batch_size=64, with_base=True,
                                     judge=("pull", 0.01))
    assert base2 == base and probe.base_correct is not None and len(probe.base_correct) == n

    def choice(rates):
        cands = [(PROBE_COSTS["pull"](r), i, j) for i, rs in enumerate(rates) for j, r in enumerate(rs)
                 if base["probe_accuracy"] - r["probe_accuracy"] <= 0.01 and not r.get("eliminated")]
        return min(cands)[1:] if cands else None

    assert choice(judged) == choice(full)
    stopped = [r for rs in judged for r in rs if r.get("eliminated")]
    assert stopped, "the harmful edit should stop before the end of the probe"
    assert all(r["probe_samples"] < n for r in stopped)
    for rs_j, rs_f in zip(judged, full):
        for rj, rf in zip(rs_j, rs_f):
            if not rj.get("eliminated"):
                assert rj == rf


class _ViewAfterConv(nn.Module):
    """A user's model that flattens with .view: it cannot run on channels-last activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def test_fast_layout_falls_back_and_restores_the_weights_exactly():
    from netmend.layout import fast_layout
    from netmend.metrics import predict

    torch.manual_seed(0)
    model = _ViewAfterConv().eval()
    x = torch.rand(300, 3, 6, 6)
    w = model.conv.weight.detach().clone()
    stride = model.conv.weight.stride()
    expect = model(x).argmax(1)
    assert torch.equal(predict(model, x), expect)              # runs, in the model's own layout
    with fast_layout(model, x[:2], len(x)):
        assert model.conv.weight.stride() == stride
    assert torch.equal(model.conv.weight, w) and model.conv.weight.stride() == stride


def test_fast_layout_gives_the_same_predictions_and_puts_the_layout_back(backdoored):
    from netmend.layout import fast_layout

    model, info = backdoored
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    before = [(m.weight.detach().clone(), m.weight.stride(), m.weight.data_ptr()) for m in convs]
    x = torch.rand(400, *info["arch_args"]["in_shape"])
    with torch.no_grad():
        ref = model(x)
        with fast_layout(model, x[:2], len(x)):
            assert any(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                       for m in convs) or all(m.weight.shape[1] == 1 for m in convs)
            out = model(x)
    assert torch.equal(ref.argmax(1), out.argmax(1)) and torch.allclose(ref, out, atol=1e-4)
    for m, (w, stride, ptr) in zip(convs, before):
        assert torch.equal(m.weight, w) and m.weight.stride() == stride and m.weight.data_ptr() == ptr


class _RatioDefect:
    """A ratio estimate Σ num / Σ den with num_i = (w + noise_i)·den_i: its value is w plus a weighted mean of the
    noise, so candidates that shift w by Δ are ranked by Δ and differ by Δ exactly."""

    def __init__(self, n: int = 3000):
        g = torch.Generator().manual_seed(0)
        self.noise, self.den = torch.rand(n, generator=g), 1 + torch.rand(n, generator=g)
        self.calls = 0

    def estimate_size(self) -> int:
        return len(self.den)

    def estimate_terms(self, model, start, stop):
        self.calls += stop - start
        w = float(model.weight.detach())
        return (w + self.noise[start:stop]) * self.den[start:stop], self.den[start:stop]


def test_race_keeps_the_smallest_ratio_measured_on_every_sample():
    """Raced candidate edits: the smallest ratio wins and is measured on the whole set (its estimate is the full
    ratio); a clearly worse one leaves after a prefix and costs less than a full pass; the model is left as it was."""
    from netmend.defects.capabilities import RatioEstimate
    from netmend.edit import Edit
    from netmend.repair.rectify import RectifyConfig, race_estimates

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    defect = _RatioDefect()
    assert isinstance(defect, RatioEstimate)
    shifts = [0.5, 0.0, 0.3, 0.001]
    edits = [Edit({"weight": torch.full((1, 1), s)}, {}) for s in shifts]
    out = race_estimates(model, defect, edits, RectifyConfig())
    assert float(model.weight.detach()) == 1.0
    n = defect.estimate_size()
    full = [float(((1 + s + defect.noise) * defect.den).sum() / defect.den.sum()) for s in shifts]
    best = min((i for i in range(len(shifts)) if not out[i]["eliminated"]), key=lambda i: out[i]["estimate"])
    assert best == 1 and not out[1]["eliminated"] and out[1]["estimated_on"] == n
    assert out[1]["estimate"] == pytest.approx(full[1], rel=1e-6)
    for i in (0, 2):                                   # 0.3 and 0.5 above the leader: out after the first prefix
        assert out[i]["eliminated"] and out[i]["estimated_on"] == 32
    # 0.001 above the leader on every sample: the paired differences have no spread, so it leaves at once too
    assert out[3]["eliminated"] and out[3]["estimated_on"] == 32
    assert defect.calls < len(shifts) * n / 2


def test_race_survivors_keeps_a_candidate_the_rest_could_still_make_the_best():
    """Two candidates whose sample terms differ only by noise of equal spread stay in the race."""
    from netmend.repair.rectify import race_survivors

    g = torch.Generator().manual_seed(1)
    den = torch.ones(300, dtype=torch.float64)
    a, b = torch.rand(300, generator=g, dtype=torch.float64), torch.rand(300, generator=g, dtype=torch.float64)
    assert sorted(race_survivors({0: (a, den), 1: (b, den)}, 3000, z=4.0)) == [0, 1]
    assert race_survivors({0: (a, den), 1: (a + 1.0, den)}, 3000, z=4.0) == [0]


def test_probe_reads_the_fit_rows_layer_inputs_the_statistics_pass_kept(backdoored):
    """The clean probe rows that are repair fit samples start at the edited layer from the inputs the statistics
    pass kept: the same rates as running the model from its input; and an upstream weight change makes those
    kept inputs unusable (None), never stale."""
    import copy

    from netmend.edit import Edit
    from netmend.editing import cached_layer_inputs, prefetch_moments, statistics_inputs
    from netmend.repair.rectify import RectifyConfig, fit_layer_inputs, make_probe, probe_rates_many

    model, info = backdoored
    model = copy.deepcopy(model).eval()
    defect = defect_for(info, pairs=1, repair_fraction=0.1)
    cfg = RectifyConfig()
    probe = make_probe(model, defect, cfg)
    assert probe.fit_rows == (len(defect.repair.y_val), len(probe.pairs) - len(defect.repair.y_val))
    layers = [k.rsplit(".", 1)[0] for k, _ in model.named_parameters() if k.endswith("weight")][-2:]
    stats = statistics_inputs(defect, cfg.stats_include_val)
    prefetch_moments(model, layers, stats)
    kept = fit_layer_inputs(model, defect, layers, cfg)
    assert set(kept) == set(layers) and all(len(t) == len(defect.repair.x_fit) for t in kept.values())
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    edits = [Edit({f"{name}.weight": 0.05 * torch.randn(params[f"{name}.weight"].shape, generator=g)})
             for name in layers]
    plain, base = probe_rates_many(model, edits, [1.0, 2.0], probe, batch_size=64, with_base=True)
    reused, base2 = probe_rates_many(model, edits, [1.0, 2.0], probe, batch_size=64, with_base=True, fit_inputs=kept)
    assert base2 == base and reused == plain
    first = [k for k, _ in model.named_parameters()][0]
    with torch.no_grad():
        params[first].add_(0.1)                     # an upstream change: the kept inputs no longer hold
    assert cached_layer_inputs(model, [layers[-1]], stats) == {}
    assert fit_layer_inputs(model, defect, layers, cfg) == {}
