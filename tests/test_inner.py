"""INNER: probe localiser gives weight sites with masks; masked_tune's Edit touches only masked weights."""
import copy

import pytest
import torch

from netmend import api
from netmend.errors import NetmendError
from netmend.locate.probe import ProbeConfig, find_blocks, locate_probe
from netmend.registry import fill_defaults
from netmend.repair.masked_tune import MaskedTuneConfig, _Tuner, masked_tune, masked_tune_defaults
from netmend.sites import Site, Sites

FAST_LOCATE = {"layers": ["conv2", "fc2"], "rep_layer_num": 2, "route_num": 8, "route_steps": 5, "probe_epochs": 5}
FAST_REPAIR = {"epochs": 2, "repair_sample_num": 64, "lr": 0.01}


def test_blocks_follow_activations(backdoored):
    model, _ = backdoored
    blocks = {b.weight: b.readout for b in find_blocks(model, torch.rand(2, 1, 8, 8), None)}
    assert blocks == {"conv1": "relu1", "conv2": "relu2", "fc1": "relu3", "fc2": "fc2"}


def test_probe_localiser_gives_weight_masks_and_timings(backdoored, defect):
    model, _ = backdoored
    sites = locate_probe(model, defect, ProbeConfig(**FAST_LOCATE))
    assert len(sites) == 2 and all(s.kind == "weight" for s in sites)
    for s in sites:
        w = model.get_submodule(s.layer).weight
        assert s.mask.shape == w.shape and 0 < s.mask.sum() <= w.numel()
    d = sites.details
    assert set(d["layer_scores"]) == {"conv2", "fc2"} and d["probe_seconds"] >= 0 and d["routing_seconds"] > 0
    top = locate_probe(model, defect, ProbeConfig(**{**FAST_LOCATE, "fault_top": 0.1}))
    assert top[0].mask.sum() <= sites[0].mask.sum()


def test_default_routing_chunk_follows_the_device():
    """CPU chunks stay cache-sized; on a GPU the largest PreAct-ResNet18 conv (512·512·3·3 weights) still routes
    25+ samples at once instead of one; every chunk is 1 to 50 samples."""
    from netmend.locate.probe import route_chunk

    conv = 512 * 512 * 3 * 3
    assert route_chunk(conv, "cpu") == 1 and route_chunk(conv, "cuda") >= 25
    assert route_chunk(784 * 512, "cpu") == 4      # fc1 of the Fashion-MNIST small CNN
    assert route_chunk(10, "cpu") == route_chunk(10, "cuda:0") == 50
    assert route_chunk(10**12, "cuda") == 1


def test_routing_counts_do_not_depend_on_how_samples_are_chunked(backdoored, defect):
    """Routing is per sample: one at a time, the automatic chunk and one chunk of all give the same fault set
    (on one thread, as conftest runs the suite: with two, batched kernels round differently and ~1.6 % of entries flip)."""
    import dataclasses

    from netmend.locate.probe import route, train_probes

    model, _ = backdoored
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        cfg = ProbeConfig(**{**FAST_LOCATE, "layers": ["fc1"]})
        blocks = find_blocks(model, defect.repair.x_fit, ["fc1"])
        ps = train_probes(model, defect, blocks, cfg)
        x = defect.repair.x_fit[:7]
        counts = [route(model, ps.blocks["fc1"], ps.probes["fc1"], x, dataclasses.replace(cfg, chunk=c))[0]
                  for c in (1, None, 7)]
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert counts[0].sum() > 0 and all(torch.equal(counts[0], c) for c in counts[1:])
    with pytest.raises(NetmendError, match="chunk"):
        route(model, ps.blocks["fc1"], ps.probes["fc1"], x, dataclasses.replace(cfg, chunk=0))


def test_masked_tune_edit_touches_only_masked_weights(backdoored, defect):
    model, _ = backdoored
    w = model.fc1.weight
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(w.shape, generator=g) < 0.2).float()
    sites = Sites([Site("fc1", "weight", 1.0, mask=mask), Site("conv2", "neuron", 0.5, index=3)], "test")
    edit = masked_tune(model, defect, sites, MaskedTuneConfig(**FAST_REPAIR))
    assert set(edit.deltas) <= {"fc1.weight", "conv2.weight"} and edit.num_changed() > 0
    assert (edit.deltas["fc1.weight"][mask == 0] == 0).all()
    if "conv2.weight" in edit.deltas:
        d = edit.deltas["conv2.weight"].clone()
        d[3] = 0
        assert (d == 0).all()                                  # neuron site = that channel's row only


def test_clean_term_draws_from_every_clean_fit_image(backdoored, defect):
    """The clean CE term's pool is the whole clean fit split, not a subset the size of the defective set."""
    model, _ = backdoored
    sites = Sites([Site("fc1", "weight", 1.0, mask=torch.ones_like(model.fc1.weight))], "test")
    work = copy.deepcopy(model).eval()
    cfg = fill_defaults(MaskedTuneConfig(**FAST_REPAIR), masked_tune_defaults, defect)      # as masked_tune does
    tuner = _Tuner(work, defect, sites.masks(work), None, cfg)
    fit = defect.repair.y_fit
    assert len(tuner.dd.y_fit) < len(fit) and len(tuner.y_clean) == len(fit)
    assert torch.equal(tuner.y_clean.sort().values, fit.sort().values)


def test_inner_preset_runs_end_to_end(backdoored, defect):
    model, _ = backdoored
    r = api.repair(model, defect, method="inner", locate_options=FAST_LOCATE, repair_options=FAST_REPAIR)
    assert r.sites.localiser == "probe" and r.edit.meta["repairer"] == "masked_tune"
    allowed = {f"{s.layer}.weight" for s in r.sites}
    assert set(r.edit.deltas) <= allowed
    assert 0 <= r.after["asr"] <= 1


def test_bad_options_give_clear_errors(backdoored, defect):
    model, _ = backdoored
    with pytest.raises(NetmendError, match="routing_grad"):
        locate_probe(model, defect, ProbeConfig(routing_grad="both"))
    with pytest.raises(NetmendError, match="needs sites"):
        masked_tune(model, defect, None, MaskedTuneConfig())
    with pytest.raises(NetmendError, match="does not exist"):
        locate_probe(model, defect, ProbeConfig(layers=["nope"]))
    assert all(p.requires_grad for p in model.parameters())      # a failed localisation leaves the model as it was
    with pytest.raises(NetmendError, match="shape"):
        masked_tune(model, defect, Sites([Site("fc2", "weight", mask=torch.ones(3, 3))]), MaskedTuneConfig())


def test_neuron_sites_on_weightless_layers_mask_the_weights_that_read_them(backdoored):
    """CARE's sites sit on flatten / activation outputs: masked_tune and finetune tune fc1's columns for them."""
    from netmend.repair.finetune import site_parameters

    model, _ = backdoored
    x = torch.rand(2, 1, 8, 8)
    sites = Sites([Site("flatten", "neuron", 1.0, index=5), Site("relu2", "neuron", 0.5, index=3)], "causal")
    masks = sites.masks(model, x)
    assert set(masks) == {"fc1"}
    m = masks["fc1"]
    per_channel = model.fc1.in_features // model.conv2.out_channels         # relu2 channel → a block of fc1 inputs
    expected = torch.zeros_like(m)
    expected[:, 5] = 1
    expected[:, 3 * per_channel:4 * per_channel] = 1
    assert torch.equal(m, expected)
    params, grad_masks = site_parameters(model, sites, x)
    assert len(params) == 1 and params[0] is model.fc1.weight and torch.equal(grad_masks[model.fc1.weight], m)
    with pytest.raises(NetmendError, match="outside flatten"):
        Sites([Site("flatten", "neuron", index=10 ** 6)], "causal").masks(model, x)
    with pytest.raises(NetmendError, match="example input"):
        sites.masks(model)


def test_care_sites_drive_masked_tune(backdoored, defect):
    """The exchange `--locate causal --repair masked_tune` runs and changes only fc1's columns for the neurons."""
    model, _ = backdoored
    r = api.repair(model, defect, localiser="causal", repairer="masked_tune", repair_options=FAST_REPAIR)
    assert r.sites.localiser == "causal" and set(r.edit.deltas) <= {"fc1.weight"}
    cols = sorted({s.index for s in r.sites})
    if "fc1.weight" in r.edit.deltas:
        d = r.edit.deltas["fc1.weight"].clone()
        d[:, cols] = 0
        assert (d == 0).all()


def test_finetune_on_weight_sites_leaves_everything_off_the_mask_exactly(backdoored, defect):
    """Weight decay and momentum must not leak into masked-out weights (the exchange `probe -> finetune`)."""
    model, _ = backdoored
    w = model.fc1.weight
    mask = (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.1).float()
    sites = Sites([Site("fc1", "weight", 1.0, mask=mask)], "test")
    from netmend.repair.finetune import FinetuneConfig, finetune

    edit = finetune(model, defect, sites, FinetuneConfig(epochs=2))
    d = edit.deltas["fc1.weight"]
    assert (d[mask == 0] == 0).all() and (d[mask == 1] != 0).any()


def test_per_defect_settings_resolve_user_value_then_table_then_default():
    """INNER's per-attack settings are defaults the repairer registers: filled in for None fields only, by the
    defect's variant (a trigger's kind), so the config holds the values used; what the user sets wins."""
    from types import SimpleNamespace

    from netmend.registry import REPAIRERS
    from netmend.repair.masked_tune import ACC_TOLERANCE, TAU

    assert REPAIRERS.entry("masked_tune").extra["defaults"] is masked_tune_defaults
    adversarial = SimpleNamespace(kind="adversarial", variant="adversarial")
    wanet = SimpleNamespace(kind="backdoor", variant="wanet")
    cfg = fill_defaults(MaskedTuneConfig(), masked_tune_defaults, adversarial)
    assert (cfg.epochs, cfg.epoch2, cfg.acc_tolerance) == (40, 2, 0.02)
    assert fill_defaults(MaskedTuneConfig(epochs=7), masked_tune_defaults, adversarial).epochs == 7   # the user's
    cfg = fill_defaults(MaskedTuneConfig(), masked_tune_defaults, wanet)
    assert (cfg.epochs, cfg.epoch2, cfg.asr_threshold, cfg.acc_tolerance) == (20, 4, TAU["wanet"], 0.01)
    wrong = SimpleNamespace(kind="wrong-predictions", variant="wrong-predictions")
    assert fill_defaults(MaskedTuneConfig(), masked_tune_defaults, wrong).acc_tolerance == ACC_TOLERANCE["wrong-predictions"] == 0.0


def test_masked_tune_says_why_it_kept_the_model_unchanged(backdoored, defect):
    """When no tuned state keeps validation accuracy (here: a learning rate that wrecks the model, no loss allowed)
    the Edit is empty and says why; the run summary (`--json`, the console table) and the HTML report carry it."""
    from netmend.report.html import render_report

    model, _ = backdoored
    r = api.repair(model, defect, method="inner", locate_options=FAST_LOCATE,
                   repair_options={**FAST_REPAIR, "lr": 50.0, "acc_tolerance": 0.0})
    assert r.edit.num_changed() == 0 and r.edit.meta["chosen"] == "start"
    assert "acc_tolerance" in r.edit.meta["unchanged_because"]
    note = r.summary()["note"]
    assert "changed no weight" in note and "acc_tolerance" in note and "acc_tolerance" in render_report("t", [r.summary()])
    sites = Sites([Site("fc1", "weight", 1.0, mask=torch.ones_like(model.fc1.weight))], "test")
    assert "unchanged_because" not in masked_tune(model, defect, sites, MaskedTuneConfig(**FAST_REPAIR)).meta
