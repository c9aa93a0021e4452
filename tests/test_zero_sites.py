"""The zero-sites baseline: exactly the masked weights of the top-k sites become zero, nothing else moves."""
import torch

import netmend
from netmend.registry import REPAIRERS
from netmend.sites import Site, Sites


def test_zero_sites_zeroes_exactly_the_top_sites(backdoored, defect):
    model, _ = backdoored
    sites = Sites([Site("fc1", "neuron", 1.0, index=2), Site("fc1", "neuron", 0.5, index=7),
                   Site("conv2", "neuron", 0.1, index=0)], "test")
    edit = REPAIRERS.get("zero-sites")(model, defect, sites, REPAIRERS.entry("zero-sites").config(top=2))
    assert set(edit.deltas) == {"fc1.weight"}
    with edit.applied(model):
        w = model.fc1.weight
        assert (w[[2, 7]] == 0).all() and (w[[0, 1, 3]] != 0).any()
    assert torch.equal(edit.deltas["fc1.weight"][[0, 1, 3]], torch.zeros(3, model.fc1.in_features))


def test_zero_sites_runs_behind_a_localiser_through_the_api(backdoored, defect):
    model, _ = backdoored
    r = netmend.api.repair(model, defect, localiser="causal", repairer="zero-sites", repair_options={"top": 3},
                           locate_options={"samples": 100}, gate=False)
    assert r.edit.meta["sites_zeroed"] == 3 and r.edit.num_changed() > 0 and r.config["repair_options"]["top"] == 3


def test_zero_sites_without_sites_or_with_top_zero_is_one_line(backdoored, defect):
    import pytest

    from netmend.errors import NetmendError

    model, _ = backdoored
    cfg = REPAIRERS.entry("zero-sites").config
    with pytest.raises(NetmendError, match="zero-sites needs sites: name a localiser"):
        netmend.api.repair(model, defect, repairer="zero-sites", gate=False)
    with pytest.raises(NetmendError, match="top must be ≥ 1"):
        REPAIRERS.get("zero-sites")(model, defect, Sites([Site("fc1", "neuron", index=0)], "test"), cfg(top=0))
