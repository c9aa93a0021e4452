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
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import care  # noqa: E402  (the benchmark's cached models and defects)
from netmend.api import versions  # noqa: E402
from netmend.locate.causal import CausalConfig, locate_causal  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def pso_speed(model, defect, sites, iterations: int, slow_iterations: int) -> dict:
    """PSO loop (objective excluded; prefix cache and low-rank setup INCLUDED in the batched time): same seed,
    same iterations, early stop off. References: one particle at a time (a) as CARE, a whole-model forward
    pass with the scale hooks per particle, for `slow_iterations`; (b) on the same cached prefix."""
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
        def go():
            scaled = ScaledModel(model, units, x, cache)
            fit = _fitness(scaled, obj, alpha, len(obj.x_bad), PSOConfig(batched=batched), mode)
            return pso_minimise(fit, init.clone(), lo, hi, its, ftol=0.0, seed=0)
        return timed(go)

    run(True, True, 1), run(False, True, 1)      # warm-up (allocator, lazy init): not charged to the first path timed
    b_short, t_b_short = run(True, True, slow_iterations)
    f, t_f = run(False, False, slow_iterations)
    b, t_b = run(True, True, iterations)
    o, t_1 = run(False, True, iterations)
    return {"particles": 20, "neurons": d, "units": units, "iterations": iterations, "rows_per_particle": len(x),
            "reference_iterations": slow_iterations,
            "batched_short_s": t_b_short, "full_forward_s": t_f, "speedup_vs_full_forward": t_f / t_b_short,
            "best_cost_batched_short": b_short.best_cost, "best_cost_full_forward": f.best_cost,
            "trace_max_diff_full_forward": max(abs(p - q) for p, q in zip(b_short.trace, f.trace)),
            "batched_s": t_b, "one_by_one_cached_s": t_1, "speedup_vs_one_by_one_cached": t_1 / t_b,
            "speedup_vs_full_forward_per_iteration_est": (t_f / slow_iterations) / (t_b / iterations),
            "best_cost_batched": b.best_cost, "best_cost_one_by_one": o.best_cost,
            "trace_max_diff_one_by_one": max(abs(p - q) for p, q in zip(b.trace, o.trace))}


def intervention_speed(model, defect, cfg: CausalConfig, loop_neurons: int) -> dict:
    """Interventions on the same probe inputs. Batched = prefix pass + batched suffix kernel (dedupe, Linear
    shortcut). References: (a) CARE's loop, a whole-model forward pass with a hook per (neuron, value), timed on
    the first `loop_neurons` neurons of each layer (all when 0) and scaled per pair; (b) a cached-prefix suffix
    pass per (neuron, value)."""
    from netmend.locate.causal import (Cut, default_layers, intervention_curves, intervention_curves_loop,
                                       intervention_curves_model_loop, output_for)

    spec = output_for(defect.kind)
    probe = spec.probe(model, defect, cfg)
    t_b = t_k = t_l = t_m = 0.0
    diff, diff_m, neurons, pairs_m = 0.0, 0.0, 0, 0
    for layer in default_layers(model):
        cut = Cut(model, layer)
        h = cut.prefix(probe.x)
        lo, hi = h.transpose(0, 1).reshape(h.shape[1], -1).aminmax(dim=1)
        vals = lo[:, None] + torch.linspace(0, 1, spec.steps)[None] * (hi - lo)[:, None]
        intervention_curves(cut, h, vals, probe.reduce, probe.x)          # warm-up, untimed
        intervention_curves_loop(cut, h, vals[:1], probe.reduce, probe.x)
        a, tb = timed(lambda: intervention_curves(Cut(model, layer), Cut(model, layer).prefix(probe.x), vals,
                                                  probe.reduce, probe.x))
        _, tk = timed(lambda: intervention_curves(cut, h, vals, probe.reduce, probe.x))   # kernel alone, on h
        b, tl = timed(lambda: intervention_curves_loop(cut, h, vals, probe.reduce, probe.x))
        k = h.shape[1] if loop_neurons <= 0 else min(loop_neurons, h.shape[1])
        c, tm = timed(lambda: intervention_curves_model_loop(model, layer, probe.x, vals[:k], probe.reduce))
        t_b, t_k, t_l, t_m, neurons, pairs_m = t_b + tb, t_k + tk, t_l + tl, t_m + tm * h.shape[1] / k, neurons + h.shape[1], \
            pairs_m + k * spec.steps
        diff = max(diff, float((a - b).abs().max()))
        diff_m = max(diff_m, float((a[:k] - c).abs().max()))
    return {"layers": default_layers(model), "neurons": neurons, "values": spec.steps, "inputs": len(probe.x),
            "batched_s": t_b, "kernel_s": t_k, "loop_s": t_l, "speedup": t_l / t_k, "curves_max_diff": diff,
            "model_loop_pairs_timed": pairs_m, "model_loop_s": t_m, "speedup_vs_model_loop": t_m / t_b,
            "curves_max_diff_model_loop": diff_m, "same_curves": max(diff, diff_m) < 1e-5}


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--slow-iterations", type=int, default=2, help="iterations run by both PSO paths for the "
                    "whole-model reference comparison")
    ap.add_argument("--loop-neurons", type=int, default=8, help="neurons per layer timed in the whole-model "
                    "intervention loop (0 = all); the time is scaled to all neurons")
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
    results["cases"]["fmnist-badnets"] = {"interventions": intervention_speed(model, defect, cfg, args.loop_neurons),
                                          "pso": pso_speed(model, defect, sites, args.iterations, args.slow_iterations)}
    print(json.dumps(results["cases"]["fmnist-badnets"], indent=1), flush=True)
    if (args.cache / "census-mlp-s0" / "model.json").is_file():
        model, defect = care.fairness_case("census", "sex")(args, 0)
        cfg = CausalConfig()
        sites = locate_causal(model, defect, cfg)
        results["cases"]["census-sex"] = {"interventions": intervention_speed(model, defect, cfg, 0),
                                          "pso": pso_speed(model, defect, sites, args.iterations, args.slow_iterations)}
        print(json.dumps(results["cases"]["census-sex"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["# CARE speed: batched kernels vs loops", "",
             f"Machine: {platform.machine()} {platform.system()} ({platform.processor() or 'cpu'}), "
             f"{os.cpu_count()} cores shared, torch {torch.__version__}, torch.set_num_threads({args.threads}), CPU. "
             f"Command: `python benchmarks/care_speed.py {' '.join(sys.argv[1:])}`", "",
             "Reference (a) is CARE's own way: a whole-model forward pass with a hook per (neuron, value), or per "
             "particle. Batched times include the prefix pass / prefix cache and low-rank setup. Reference (b) is "
             "the weaker cached-prefix loop (one suffix pass per pair / particle).", "",
             "| case | kernel | reference | work | batched s | reference s | speed-up | agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        i, p = r["interventions"], r["pso"]
        work = f"{i['neurons']} neurons × {i['values']} values × {i['inputs']} inputs"
        scaled = "" if i["model_loop_pairs_timed"] == i["neurons"] * i["values"] else \
            f" (loop timed on {i['model_loop_pairs_timed']} pairs, scaled per pair)"
        lines.append(f"| {name} | interventions | (a) whole-model forward + hook per pair{scaled} | {work} "
                     f"| {i['batched_s']:.3f} | {i['model_loop_s']:.2f} | **{i['speedup_vs_model_loop']:.1f}×** "
                     f"| curves Δ≤{i['curves_max_diff_model_loop']:.1e} |")
        lines.append(f"| {name} | interventions | (b) cached prefix, suffix pass per pair (batched: the kernel on the "
                     f"same cached prefix) | {work} | {i['kernel_s']:.3f} | {i['loop_s']:.3f} | {i['speedup']:.1f}× | curves Δ≤{i['curves_max_diff']:.1e} |")
        lines.append(f"| {name} | PSO | (a) whole-model forward + hooks per particle | 20 particles × "
                     f"{p['reference_iterations']} it, {p['neurons']} neurons, {p['rows_per_particle']} rows "
                     f"| {p['batched_short_s']:.3f} | {p['full_forward_s']:.2f} | **{p['speedup_vs_full_forward']:.1f}×** "
                     f"| best {p['best_cost_batched_short']:.5f} vs {p['best_cost_full_forward']:.5f} "
                     f"(trace Δ≤{p['trace_max_diff_full_forward']:.1e}) |")
        lines.append(f"| {name} | PSO | (b) cached prefix, suffix pass per particle | 20 particles × {p['iterations']} it "
                     f"| {p['batched_s']:.3f} | {p['one_by_one_cached_s']:.3f} | {p['speedup_vs_one_by_one_cached']:.1f}× "
                     f"| best {p['best_cost_batched']:.5f} vs {p['best_cost_one_by_one']:.5f} "
                     f"(trace Δ≤{p['trace_max_diff_one_by_one']:.1e}) |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json/.md")


if __name__ == "__main__":
    main()
