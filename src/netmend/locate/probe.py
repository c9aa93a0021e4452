"""INNER's localiser (Chen et al., ISSTA 2024; docs/methods/inner.md): probes, layer scores, weight routing.

1. A linear probe (GAP + Linear) reads each candidate block's output; all probes are trained in one
   batched pass on features captured in one forward over the clean repair data.
2. Layer score = CE between the probe's mean softmax on clean and on misbehaving inputs: a block
   whose probe already "sees" the misbehaviour is where it is made. The top `rep_layer_num` win.
3. Routing: per evidence sample a mask r over the block's weight is shrunk (L1) while keeping the
   probe's current decision; weights above the mean route are critical; the fault set is their
   union, ranked by frequency. Routing is vmapped over samples (chunks), not looped.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..defects.base import Defect
from ..defects.capabilities import Regenerating, Stamped, Targeted
from ..errors import NetmendError, require
from ..hooks import add_forward_hook, forward_hooks, get_layer, weight_layers
from ..metrics import predict
from ..registry import LOCALISERS
from ..sites import Site, Sites

PASS_THROUGH = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ReLU6,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity)


@dataclass
class ProbeConfig:
    layers: list[str] | None = None      # weight layers to probe ("conv2" or "conv2@relu2"); default all Linear/Conv2d
    rep_layer_num: int = 3               # layers repaired (top scores)
    probe_train_num: int = 1000          # clean repair samples the probes are trained on
    probe_epochs: int = 50
    probe_lr: float = 0.01
    probe_batch: int = 256
    select_num: int = 30                 # ≤ this many clean and defective images for the layer scores
    route_num: int = 100                 # defective images routed
    route_steps: int = 40
    route_lr: float = 0.009              # η
    route_l1: float = 0.005              # λ
    routing_grad: str = "routing"        # routing: ∂L/∂r (default) | weight: ∂L/∂W' (the released code)
    fault_top: float | None = None       # keep only this fraction of the fault set by frequency (None: full union)
    chunk: int | None = None             # samples routed at once (memory: chunk × weight size); None: by the
                                         # device's entry budget (route_chunk), at most 50 samples
    seed: int = 0
    device: str = "cpu"


@dataclass
class Block:
    """A repairable block: its weight module, the modules applied after it, and where the probe reads."""

    weight: str
    chain: list[str] = field(default_factory=list)

    @property
    def readout(self) -> str:
        return self.chain[-1] if self.chain else self.weight


@dataclass
class ProbeSet:
    """Trained probes {weight layer: Linear} for the blocks; what the masked repair's probe loss uses."""

    blocks: dict[str, Block]
    probes: dict[str, nn.Linear]
    val_accuracy: dict[str, float]


# ----------------------------------------------------------------------------- blocks and features

def find_blocks(model: nn.Module, x: torch.Tensor, names: list[str] | None) -> list[Block]:
    """Each weight layer plus the pass-through modules (BN, activations) fed directly by it, found by
    tracing one forward pass (a chain stops where a module's input is not the previous output)."""
    names = names or weight_layers(model)
    require(len(names) > 0, "the model has no Linear or Conv2d layer to probe")
    order: list[tuple[str, nn.Module, int, int]] = []
    hooks = []
    for n, m in model.named_modules():
        if n and not list(m.children()):
            def hook(mod, inp, out, _n=n):
                i = inp[0] if isinstance(inp, tuple) and inp else inp
                order.append((_n, mod, id(i), id(out)))
            hooks.append((m, hook))
    with forward_hooks(hooks), torch.no_grad():
        model(x[:2])
    pos = {n: i for i, (n, *_rest) in reversed(list(enumerate(order)))}
    blocks = []
    for spec in names:
        w, _, readout = spec.partition("@")
        mod = get_layer(model, w)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise NetmendError(f"probe layer {w!r} is a {type(mod).__name__}; INNER probes Linear or Conv2d layers")
        if w not in pos:
            raise NetmendError(f"layer {w!r} is not used in the forward pass")
        chain, prev_out = [], order[pos[w]][3]
        for n, m, in_id, out_id in order[pos[w] + 1:]:
            if readout and chain and chain[-1] == readout:
                break
            if not isinstance(m, PASS_THROUGH) or in_id != prev_out:
                break
            chain.append(n)
            prev_out = out_id
        if readout and readout != w and readout not in chain:
            raise NetmendError(f"readout {readout!r} does not directly follow {w!r} through BN/activations")
        blocks.append(Block(w, chain))
    return blocks


def pooled(h: torch.Tensor) -> torch.Tensor:
    """Global average pooling of spatial maps; vectors pass unchanged."""
    return h.flatten(2).mean(2) if h.dim() > 2 else h.flatten(1)


@torch.no_grad()
def block_features(model: nn.Module, blocks: list[Block], x: torch.Tensor, batch: int = 1024,
                   device: str = "cpu") -> dict[str, torch.Tensor]:
    """Pooled readout features of every block, captured in one forward per batch."""
    outs: dict[str, list[torch.Tensor]] = {b.weight: [] for b in blocks}
    hooks = [(get_layer(model, b.readout), lambda _m, _i, o, _w=b.weight: outs[_w].append(pooled(o).detach().cpu()))
             for b in blocks]
    with forward_hooks(hooks):
        for i in range(0, len(x), batch):
            model(x[i: i + batch].to(device))
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in outs.items()}


def train_probes(model: nn.Module, defect: Defect, blocks: list[Block], cfg) -> ProbeSet:
    """All probes trained jointly (sum of their CE losses) on the clean fit data; best epoch on val kept."""
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = defect.repair.x_fit, defect.repair.y_fit
    idx = torch.randperm(len(y), generator=g)[: cfg.probe_train_num]
    x, y = x[idx], y[idx]
    feats = block_features(model, blocks, x, device=cfg.device)
    vfeats = block_features(model, blocks, defect.repair.x_val, device=cfg.device)
    yv = defect.repair.y_val
    k = defect.num_classes or int(max(y.max(), yv.max())) + 1
    torch.manual_seed(cfg.seed)
    probes = {b.weight: nn.Linear(feats[b.weight].shape[1], k) for b in blocks}
    params = [p for pr in probes.values() for p in pr.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.probe_lr)
    best = {n: (-1.0, None) for n in probes}
    for _ in range(cfg.probe_epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), cfg.probe_batch):
            b = perm[i: i + cfg.probe_batch]
            loss = sum(F.cross_entropy(pr(feats[n][b]), y[b]) for n, pr in probes.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for n, pr in probes.items():
                acc = float((pr(vfeats[n]).argmax(1) == yv).float().mean())
                if acc > best[n][0]:
                    best[n] = (acc, copy.deepcopy(pr.state_dict()))
    for n, pr in probes.items():
        pr.load_state_dict(best[n][1])
        pr.requires_grad_(False).to(cfg.device)
    return ProbeSet({b.weight: b for b in blocks}, probes, {n: best[n][0] for n in probes})


# ----------------------------------------------------------------------------- defective data

@dataclass
class DefectiveData:
    """Misbehaving inputs with the labels they should get: `fit` to repair, `val` for stopping."""

    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    source: str
    c_fit: torch.Tensor | None = None    # clean twins, kept when the defect can regenerate its evidence
    c_val: torch.Tensor | None = None    # against a changed model (`Defect.regenerate`: adversarial examples)


def defective_data(defect: Defect, n_max: int, seed: int = 0, val_fraction: float = 0.2) -> DefectiveData:
    """Backdoors: the repair data's non-target samples stamped with the trigger (INNER relabels triggered
    images to their true class), plus the evidence pairs. Other defects: their evidence, split fit/val."""
    if isinstance(defect, Stamped) and isinstance(defect, Targeted) and defect.target is not None:
        stamp, target = defect.stamp, defect.target
        r = defect.repair
        keep, keep_v = r.y_fit != target, r.y_val != target
        xf, yf = stamp(r.x_fit[keep][:n_max]), r.y_fit[keep][:n_max]
        if defect.pairs is not None and len(defect.pairs):
            xf, yf = torch.cat([defect.pairs.corrupted, xf])[:n_max], torch.cat([defect.pairs.labels, yf])[:n_max]
        return DefectiveData(xf, yf, stamp(r.x_val[keep_v]), r.y_val[keep_v], "stamped repair data + pairs")
    x, y = defect.evidence()
    require(len(y) > 0, f"{defect.kind} defect has no evidence samples to repair with")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 17))
    n_val = int(round(val_fraction * len(y))) if len(y) >= 5 else 0
    vi, fi = perm[:n_val], perm[n_val:][:n_max]
    if isinstance(defect, Regenerating) and defect.pairs is not None:
        c = defect.pairs.clean
        return DefectiveData(x[fi], y[fi], x[vi], y[vi], "evidence, regenerated against the model in repair",
                             c[fi], c[vi])
    return DefectiveData(x[fi], y[fi], x[vi], y[vi], "evidence")


def violation_rate(defect: Defect, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    """INNER's ASR on a defective set: share predicted as the attack target (non-target samples) when the
    defect has one and measures by it, else the share still misclassified."""
    if not len(y):
        return float("nan")
    pred = predict(model, x, device=device)
    target = defect.target if isinstance(defect, Targeted) else None
    if target is not None and defect.violation_measure == "target":
        keep = y != target
        return float((pred[keep] == target).float().mean()) if keep.any() else float("nan")
    return float((pred != y).float().mean())


# ----------------------------------------------------------------------------- scores and routing

def layer_scores(model: nn.Module, defect: Defect, ps: ProbeSet, dd: DefectiveData, cfg) -> dict[str, float]:
    """score_l = −Σ b_l log(c_l + 1e-7): c_l / b_l mean probe softmax on clean / misbehaving inputs."""
    r = defect.repair
    pc = predict(model, r.x_fit, device=cfg.device)
    clean = r.x_fit[pc == r.y_fit][: cfg.select_num]
    pd = predict(model, dd.x_fit, device=cfg.device)
    bad = dd.x_fit[pd != dd.y_fit][: cfg.select_num]
    require(len(bad) > 0, "the model does not misbehave on any evidence sample: nothing to localise")
    blocks = list(ps.blocks.values())
    fc, fb = block_features(model, blocks, clean, device=cfg.device), block_features(model, blocks, bad, device=cfg.device)
    scores = {}
    with torch.no_grad():
        for n, pr in ps.probes.items():
            c = F.softmax(pr(fc[n].to(cfg.device)), 1).mean(0)
            b = F.softmax(pr(fb[n].to(cfg.device)), 1).mean(0)
            scores[n] = float(-(b * torch.log(c + 1e-7)).sum())
    return scores


def block_logits_fn(model: nn.Module, block: Block, probe: nn.Linear):
    """f(W', key) -> probe logits of one sample, with the block's weight replaced by W' (vmappable)."""
    wmod = get_layer(model, block.weight)
    chain = [get_layer(model, n) for n in block.chain]
    bias = {"bias": wmod.bias.detach()} if getattr(wmod, "bias", None) is not None else {}

    def f(w: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        h = functional_call(wmod, {"weight": w, **bias}, (key[None],))
        for m in chain:
            h = m(h)
        return probe(pooled(h))[0]

    return f


# Routing is memory-bound elementwise work on (chunk × weight) tensors. On a CPU, chunks of about 2 M entries (8 MB in
# float32) stay in cache: on fc1 of the Fashion-MNIST small CNN (401 k weights) 5 samples at a time route 7.7× faster
# than 25 (52 → 6.8 s for 100 samples, one thread); small layers gain from larger chunks (per-call overhead).
# On a GPU the cost is per kernel launch, not cache: PreAct-ResNet18's 2.4 M-weight convs got 1-sample chunks by the
# CPU rule and routed in 31.8 s (H100) where 25-sample chunks had taken 1.6 s (H200), so there the budget is 64 M
# entries (256 MB per float32 tensor), which keeps 25+ samples per chunk for every layer of that network.
ROUTE_ENTRIES = {"cpu": 2_000_000, "accelerator": 64_000_000}
ROUTE_MAX_CHUNK = 50


def route_chunk(numel: int, device: torch.device | str) -> int:
    """Samples routed at once by default: as many as fit the device's entry budget, 1 to ROUTE_MAX_CHUNK."""
    budget = ROUTE_ENTRIES["cpu" if torch.device(device).type == "cpu" else "accelerator"]
    return max(1, min(ROUTE_MAX_CHUNK, budget // max(1, numel)))


def route(model: nn.Module, block: Block, probe: nn.Linear, x: torch.Tensor, cfg) -> tuple[torch.Tensor, int]:
    """Frequency (per weight entry) of being critical over the routed samples; vmapped over a chunk."""
    wmod = get_layer(model, block.weight)
    w = wmod.weight.detach()
    with torch.no_grad(), _capture_input(model, block.weight) as keys:
        for i in range(0, len(x), 1024):
            model(x[i: i + 1024].to(cfg.device))
    key = torch.cat(keys)
    f = block_logits_fn(model, block, probe)
    with torch.no_grad():
        yhat = vmap(f, in_dims=(None, 0))(w, key).argmax(-1)

    def loss(wp, k, t):
        return F.cross_entropy(f(wp, k)[None], t[None])

    g_w = vmap(grad(loss), in_dims=(0, 0, 0))
    counts = torch.zeros_like(w)
    chunk = cfg.chunk if cfg.chunk is not None else route_chunk(w.numel(), w.device)
    require(chunk >= 1, f"chunk must be ≥ 1, got {chunk}")
    for i in range(0, len(key), chunk):
        k, t = key[i: i + chunk], yhat[i: i + chunk]
        r = torch.ones((len(k),) + tuple(w.shape), device=w.device)
        for _ in range(cfg.route_steps):
            gw = g_w(r * w, k, t)
            if cfg.routing_grad == "routing":
                gw.mul_(w)
            # r ← clamp(r − η·g − λ·sign(r), 0, 1), in place: the same operations in the same order
            r.sub_(gw.mul_(cfg.route_lr)).sub_(torch.sign(r).mul_(cfg.route_l1)).clamp_(0, 1)
        mean = r.flatten(1).mean(1).view(-1, *([1] * w.dim()))
        counts += (r > mean).sum(0)
    return counts, len(key)


class _capture_input:
    """Collects the inputs (keys) of one layer over several forwards."""

    def __init__(self, model: nn.Module, name: str):
        self.layer, self.keys, self.h = get_layer(model, name), [], None

    def __enter__(self):
        self.h = add_forward_hook(self.layer, lambda _m, i, _o: self.keys.append(i[0].detach()))
        return self.keys

    def __exit__(self, *exc):
        self.h.remove()


def fault_mask(counts: torch.Tensor, top: float | None) -> torch.Tensor:
    """The fault set: every weight critical at least once (the code), or the top fraction by frequency."""
    mask = counts > 0
    if top is not None:
        require(0 < top <= 1, f"fault_top must be in (0, 1], got {top}")
        k = max(1, int(round(top * mask.numel())))
        thr = counts.flatten().kthvalue(counts.numel() - k + 1).values
        mask = mask & (counts >= max(float(thr), 1.0))
    return mask.float()


@LOCALISERS.register("probe", "INNER: probe-based layer scores, then per-weight routing masks (fault weights)",
                     config=ProbeConfig, needs=("argmax",))
def locate_probe(model: nn.Module, defect: Defect, cfg: ProbeConfig) -> Sites:
    require(cfg.routing_grad in ("routing", "weight"), f"routing_grad must be 'routing' or 'weight', got {cfg.routing_grad!r}")
    require(cfg.rep_layer_num >= 1, f"rep_layer_num must be ≥ 1, got {cfg.rep_layer_num}")
    model = model.to(cfg.device).eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        t0 = time.perf_counter()
        blocks = find_blocks(model, defect.repair.x_fit.to(cfg.device), cfg.layers)
        ps = train_probes(model, defect, blocks, cfg)
        t1 = time.perf_counter()
        dd = defective_data(defect, max(cfg.route_num, cfg.select_num), cfg.seed)
        scores = layer_scores(model, defect, ps, dd, cfg)
        chosen = sorted(scores, key=lambda n: -scores[n])[: cfg.rep_layer_num]
        pd = predict(model, dd.x_fit, device=cfg.device)
        x_route = torch.cat([dd.x_fit[pd != dd.y_fit], dd.x_fit[pd == dd.y_fit]])[: cfg.route_num]
        t2 = time.perf_counter()
        sites, fault = [], {}
        for n in chosen:
            counts, n_routed = route(model, ps.blocks[n], ps.probes[n], x_route, cfg)
            mask = fault_mask(counts, cfg.fault_top).cpu()
            fault[n] = {"weights": int(mask.sum()), "of": int(mask.numel()), "fraction": float(mask.mean()),
                        "routed_samples": n_routed, "max_frequency": int(counts.max())}
            sites.append(Site(n, "weight", scores[n], mask=mask,
                              info={"readout": ps.blocks[n].readout, "frequency_max": int(counts.max())}))
        t3 = time.perf_counter()
    finally:                              # the caller's model keeps its flags, also when a bad option raises
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    out = Sites(sites, "probe", {"layer_scores": scores, "probe_val_accuracy": ps.val_accuracy,
                                 "readouts": {b.weight: b.readout for b in blocks}, "fault_set": fault,
                                 "defective_source": dd.source, "probe_seconds": t1 - t0,
                                 "selection_seconds": t2 - t1, "routing_seconds": t3 - t2}, t3 - t0)
    out.probes = ps        # not serialised: handed to the masked repair for its probe loss
    return out
