"""Speed of CARE's two batched kernels against the loops they replace, measured in one run.

    python benchmarks/care_speed.py                 # Fashion-MNIST BadNets small CNN (+ Census MLP if cached)
    python benchmarks/care_speed.py --iterations 10 --threads 1

1. PSO: all particles in one batched suffix pass on cached prefix activations, against evaluating the
   particles one by one (a) on the same cached prefix and (b) with a whole-model forward pass each (CARE's
   way). Same seed, same iterations (early stop off), so the best-cost traces must agree.
2. Interventions: (neuron, value) pairs × inputs in a few batched passes, against one suffix pass per
   (neuron, value) (CARE's loop). The curves must agree.
Writes benchmarks/results/care_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import care  # noqa: E402  (the benchmark's cached models and defects)
from netmend.api import versions  # noqa: E402
from netmend.locate.causal import CausalConfig, locate_causal  # noqa: E402
from netmend.repair.pso import PSOConfig, repair_pso  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def pso_speed(model, defect, sites, iterations: int, slow_iterations: int) -> dict:
    """Times the PSO loop alone (objective, prefix cache and baking excluded): same seed, same iterations."""
    from netmend.repair.pso import KIND_DEFAULTS, MODES, PSOConfig, ScaledModel, _fitness, neuron_units, pso_minimise

    units = neuron_units(sites, None)
    mode_name, alpha = KIND_DEFAULTS.get(defect.kind, ("scale", 0.2))
    mode = MODES[mode_name]
    obj = defect.objective(model)
    x = torch.cat([obj.x_bad, obj.x_good])
    d = len(units)
    lo, hi = torch.full((d,), mode.lower), torch.full((d,), mode.upper)
    g = torch.Generator().manual_seed(1)
    init = torch.full((20, d), mode.identity)
    init[1:] = lo + (hi - lo) * torch.rand(19, d, generator=g)

    def run(batched: bool, cache: bool, its: int):
        scaled = ScaledModel(model, units, x, cache)
        fit = _fitness(scaled, obj, alpha, len(obj.x_bad), PSOConfig(batched=batched), mode)
        return timed(lambda: pso_minimise(fit, init.clone(), lo, hi, its, ftol=0.0, seed=0))

    b, t_b = run(True, True, iterations)
    o, t_1 = run(False, True, iterations)
    f, t_f = run(False, False, slow_iterations)
    return {"particles": 20, "neurons": d, "iterations": iterations, "rows_per_particle": len(x),
            "batched_s": t_b, "one_by_one_cached_s": t_1, "full_forward_iterations": slow_iterations,
            "full_forward_s": t_f, "speedup_vs_one_by_one_cached": t_1 / t_b,
            "speedup_vs_full_forward_per_iteration": (t_f / slow_iterations) / (t_b / iterations),
            "best_cost_batched": b.best_cost, "best_cost_one_by_one": o.best_cost,
            "trace_max_diff_one_by_one": max(abs(p - q) for p, q in zip(b.trace, o.trace)),
            "trace_max_diff_full_forward": max(abs(p - q) for p, q in zip(b.trace, f.trace))}


def intervention_speed(model, defect, cfg: CausalConfig) -> dict:
    """Times the intervention kernels alone on cached prefix activations (probe and prefix excluded)."""
    from netmend.locate.causal import Cut, default_layers, intervention_curves, intervention_curves_loop, output_for

    spec = output_for(defect.kind)
    probe = spec.probe(model, defect, cfg)
    t_b = t_l = 0.0
    diff, neurons = 0.0, 0
    for layer in default_layers(model):
        cut = Cut(model, layer)
        h = cut.prefix(probe.x)
        lo, hi = h.transpose(0, 1).reshape(h.shape[1], -1).aminmax(dim=1)
        vals = lo[:, None] + torch.linspace(0, 1, spec.steps)[None] * (hi - lo)[:, None]
        a, tb = timed(lambda: intervention_curves(cut, h, vals, probe.reduce, probe.x))
        b, tl = timed(lambda: intervention_curves_loop(cut, h, vals, probe.reduce, probe.x))
        t_b, t_l, neurons = t_b + tb, t_l + tl, neurons + h.shape[1]
        diff = max(diff, float((a - b).abs().max()))
    return {"layers": default_layers(model), "neurons": neurons, "values": spec.steps, "inputs": len(probe.x),
            "batched_s": t_b, "loop_s": t_l, "speedup": t_l / t_b, "curves_max_diff": diff, "same_ranking": diff < 1e-5}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--slow-iterations", type=int, default=3, help="iterations for the whole-model reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/models/care"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "care_speed")
    args = ap.parse_args(argv)
    args.device = "cpu"
    torch.set_num_threads(args.threads)
    results = {"machine": versions(), "threads": args.threads, "cases": {}}
    model, defect = care.backdoor_case("fashion-mnist")(args, 0)
    cfg = CausalConfig()
    sites = locate_causal(model, defect, cfg)
    results["cases"]["fmnist-badnets"] = {"interventions": intervention_speed(model, defect, cfg),
                                          "pso": pso_speed(model, defect, sites, args.iterations, args.slow_iterations)}
    print(json.dumps(results["cases"]["fmnist-badnets"], indent=1), flush=True)
    if (args.cache / "census-mlp-s0" / "model.json").is_file():
        model, defect = care.fairness_case("census", "sex")(args, 0)
        cfg = CausalConfig()
        sites = locate_causal(model, defect, cfg)
        results["cases"]["census-sex"] = {"interventions": intervention_speed(model, defect, cfg),
                                          "pso": pso_speed(model, defect, sites, args.iterations, args.slow_iterations)}
        print(json.dumps(results["cases"]["census-sex"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["# CARE speed: batched kernels vs loops", "",
             f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, {args.threads} thread(s), CPU. "
             f"Command: `python benchmarks/care_speed.py {' '.join(sys.argv[1:])}`", "",
             "| case | kernel | work | batched s | loop s | speed-up | agreement |", "|---|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        i, p = r["interventions"], r["pso"]
        lines.append(f"| {name} | interventions | {i['neurons']} neurons × {i['values']} values × {i['inputs']} inputs "
                     f"| {i['batched_s']:.3f} | {i['loop_s']:.3f} | {i['speedup']:.1f}× | curves Δ≤{i['curves_max_diff']:.1e}, "
                     f"agree to 1e-5: {i['same_ranking']} |")
        lines.append(f"| {name} | PSO vs one-by-one (cached prefix) | {p['particles']} particles × {p['iterations']} it, "
                     f"{p['neurons']} neurons | {p['batched_s']:.3f} | {p['one_by_one_cached_s']:.3f} "
                     f"| {p['speedup_vs_one_by_one_cached']:.1f}× | best {p['best_cost_batched']:.5f} vs "
                     f"{p['best_cost_one_by_one']:.5f} (trace Δ≤{p['trace_max_diff_one_by_one']:.1e}) |")
        lines.append(f"| {name} | PSO vs one-by-one whole-model forward (per iteration) | {p['full_forward_iterations']} it "
                     f"| {p['batched_s'] / p['iterations']:.3f}/it | {p['full_forward_s'] / p['full_forward_iterations']:.3f}/it "
                     f"| {p['speedup_vs_full_forward_per_iteration']:.1f}× | trace Δ≤{p['trace_max_diff_full_forward']:.1e} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json/.md")


if __name__ == "__main__":
    main()
