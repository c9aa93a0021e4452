"""CARE on a non-Sequential model: the torch.fx cut (hooks.split_at) against rerunning the whole model per
intervention (the fallback, which was the only path for such models before).

    python benchmarks/care_any_model.py                          # full CARE both ways (the 'before' is slow)
    python benchmarks/care_any_model.py --before-iterations 5    # 'before' PSO capped at 5 iterations, extrapolated

A residual CNN (Conv-BN-ReLU, one residual block with a skip connection, ~100k parameters, custom forward:
not an nn.Sequential) is trained for --epochs on Fashion-MNIST with a BadNets trigger (10 % poisoned, target 0),
cached in --cache; then `netmend.repair(model, defect, method="care")` with default settings runs
  after:  as netmend does now (the model is cut by torch.fx at the localised layer);
  before: with the torch.fx cut switched off (Cut falls back to the whole-model hook path, exactly the code path
          every non-Sequential model took before: prefix by run_to, interventions and PSO particles by whole-model
          forward passes with the layer's output replaced / scaled by hooks).
With --before-iterations R the 'before' PSO stops after R iterations; its full time is extrapolated as
  measured(R) + (iterations of the full 'after' run − R) × (one 20-particle fitness evaluation on the fallback path,
  timed separately).
Prints the machine, torch threads, seed and the seconds before/after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

import netmend
from netmend.data.datasets import load_dataset, split_indices
from netmend.data.triggers import TriggerSpec, build_trigger, poison_indices, stamp_batched
from netmend.defects.backdoor import BackdoorDefect, BackdoorOptions
from netmend.locate import causal
from netmend.train import TrainConfig, fit
from netmend.zoo.models import Normalize


class ResCNN(nn.Module):
    """1×28×28 → 10: conv-bn-relu, pool, residual block relu(bn(conv(relu(bn(conv(h))))) + h), pool, 2-layer head."""

    def __init__(self, mean: float = 0.286, std: float = 0.353, c: int = 16, hidden: int = 120, classes: int = 10):
        super().__init__()
        self.norm = Normalize([mean], [std])
        self.conv1, self.bn1, self.relu1, self.pool1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), \
            nn.MaxPool2d(2)
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.pool2, self.flatten = nn.MaxPool2d(2), nn.Flatten()
        self.fc1, self.relu4, self.fc2 = nn.Linear(c * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.pool1(self.relu1(self.bn1(self.conv1(self.norm(x)))))
        r = self.relu2(self.bn2(self.conv2(h)))
        h = self.relu3(self.bn3(self.conv3(r)) + h)                  # the skip connection
        return self.fc2(self.relu4(self.fc1(self.flatten(self.pool2(h)))))


def build(data, args):
    splits = split_indices(len(data.y_train), args.seed)
    trigger = build_trigger(TriggerSpec(kind="badnets", size=3), data.in_shape)
    torch.manual_seed(args.seed)
    mean, std = data.channel_stats()
    model = ResCNN(mean[0], std[0])
    cache = Path(args.cache)
    if cache.is_file():
        model.load_state_dict(torch.load(cache))
    else:
        tr = torch.tensor(splits["train"])
        x, y = data.x_train[tr].clone(), data.y_train[tr].clone()
        p = torch.tensor(poison_indices(len(y), 0.1, args.seed), dtype=torch.long)
        x[p], y[p] = stamp_batched(trigger, x[p]), 0
        t0 = time.perf_counter()
        fit(model, x, y, TrainConfig(epochs=args.epochs, seed=args.seed))
        print(f"trained {args.epochs} epoch(s) in {time.perf_counter() - t0:.0f} s")
        torch.save(model.state_dict(), cache)
    return model.eval(), BackdoorDefect(data, splits, trigger, 0, BackdoorOptions(seed=args.seed))


def run_care(model, defect, seed, fallback: bool, iterations: int | None = None):
    orig = causal.split_at
    if fallback:
        causal.split_at = lambda m, l: (None, "forced: the torch.fx cut is switched off for the 'before' timing")
    try:
        opts = {"iterations": iterations} if iterations else {}
        t0 = time.perf_counter()
        res = netmend.repair(model, defect, method="care", repair_options=opts, seed=seed)
        wall = time.perf_counter() - t0
    finally:
        causal.split_at = orig
    m = res.edit.meta
    return {"wall_s": round(wall, 2), "locate_s": round(res.locate_seconds, 2), "repair_s": round(res.repair_seconds, 2),
            "pso_iterations": m["iterations"], "best_cost": m["best_cost"],
            "asr": res.after.get("asr"), "clean_accuracy": res.after.get("clean_accuracy"),
            "layers": res.sites.details["layers"], "sites": len(res.sites)}


def fitness_seconds(model, defect, sites_res_layers, fallback: bool, seed: int, reps: int = 1) -> float:
    """Seconds of one 20-particle PSO fitness evaluation (one PSO iteration) on the repair objective."""
    from netmend.locate.causal import CausalConfig, locate_causal
    from netmend.repair.pso import KIND_DEFAULTS, MODES, PSOConfig, ScaledModel, _fitness, neuron_units

    sites = locate_causal(model, defect, CausalConfig(layers=sites_res_layers, seed=seed))    # same sites both ways
    orig = causal.split_at
    if fallback:
        causal.split_at = lambda m, l: (None, "forced")
    try:
        units = neuron_units(sites, None)
        mode_name, alpha = KIND_DEFAULTS["backdoor"]
        mode = MODES[mode_name]
        obj = defect.objective(model)
        x = torch.cat([obj.x_bad, obj.x_good])
        scaled = ScaledModel(model, units, x)
        f = _fitness(scaled, obj, alpha, len(obj.x_bad), PSOConfig(), mode)
        pos = torch.rand(20, len(units), generator=torch.Generator().manual_seed(seed)) * 4 - 2
        f(pos[:1])                                                         # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            f(pos)
        return (time.perf_counter() - t0) / reps
    finally:
        causal.split_at = orig


def main():
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("NETMEND_DATA", "/work/shared/data"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before-iterations", type=int, default=None,
                    help="cap the 'before' PSO at R iterations and extrapolate (default: the full run)")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--fitness", action="store_true", help="also time one 20-particle PSO iteration both ways")
    ap.add_argument("--cache", default="/tmp/netmend_care_any_model_rescnn.pt")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NETMEND_QUIET", "1")
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} "
          f"({os.cpu_count()} cores), python {platform.python_version()}, torch {torch.__version__}")
    print(f"torch threads: {torch.get_num_threads()}, seed: {args.seed}")
    data = load_dataset("fashion-mnist", args.data_dir)
    model, defect = build(data, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: ResCNN ({type(model).__name__}, not nn.Sequential), {n_params} parameters; before: {defect.metrics(model)}")
    out = {"threads": torch.get_num_threads(), "seed": args.seed, "parameters": n_params}
    after = run_care(model, defect, args.seed, fallback=False)
    print(f"after  (torch.fx cut):        {json.dumps(after)}")
    out["after"] = after
    if not args.skip_before:
        before = run_care(model, defect, args.seed, fallback=True, iterations=args.before_iterations)
        print(f"before (whole-model reruns):  {json.dumps(before)}")
        out["before"] = before
    if args.fitness or (args.before_iterations and not args.skip_before):
        t_it = fitness_seconds(model, defect, after["layers"], True, args.seed)
        t_it_after = fitness_seconds(model, defect, after["layers"], False, args.seed, reps=5)
        out.update({"before_fitness_s": round(t_it, 3), "after_fitness_s": round(t_it_after, 4)})
        print(f"one 20-particle PSO iteration: before {t_it:.2f} s, after {t_it_after:.4f} s")
        if "before" in out and args.before_iterations:
            extra = max(0, after["pso_iterations"] - out["before"]["pso_iterations"])
            est = out["before"]["wall_s"] + extra * t_it
            out["before_wall_s_extrapolated"] = round(est, 1)
            print(f"before, extrapolated to the after run's {after['pso_iterations']} PSO iterations: {est:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
