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
    base = dict(iterations=iterations, ftol=0.0, seed=0, init="identity+uniform")
    batched, t_b = timed(lambda: repair_pso(model, defect, sites, PSOConfig(**base)))
    one, t_1 = timed(lambda: repair_pso(model, defect, sites, PSOConfig(batched=False, **base)))
    short = {**base, "iterations": slow_iterations}
    full, t_f = timed(lambda: repair_pso(model, defect, sites, PSOConfig(batched=False, cache_prefix=False, **short)))
    tr_b, tr_1, tr_f = batched.meta["trace"], one.meta["trace"], full.meta["trace"]
    per_b = t_b / len(tr_b)
    return {
        "particles": batched.meta["particles"], "neurons": len(batched.meta["scales"]), "iterations": len(tr_b),
        "rows_per_particle": None,
        "batched_s": t_b, "one_by_one_cached_s": t_1, "full_forward_iterations": len(tr_f), "full_forward_s": t_f,
        "speedup_vs_one_by_one_cached": t_1 / t_b,
        "speedup_vs_full_forward_per_iteration": (t_f / len(tr_f)) / per_b,
        "best_cost_batched": tr_b[-1], "best_cost_one_by_one": tr_1[-1],
        "trace_max_diff_one_by_one": max(abs(a - b) for a, b in zip(tr_b, tr_1)),
        "trace_max_diff_full_forward": max(abs(a - b) for a, b in zip(tr_b, tr_f)),
    }


def intervention_speed(model, defect, cfg: CausalConfig) -> dict:
    fast, t_b = timed(lambda: locate_causal(model, defect, cfg))
    slow, t_l = timed(lambda: locate_causal(model, defect, CausalConfig(**{**cfg.__dict__, "loop": True})))
    diff = max(float((fast.details["curves"][l] - slow.details["curves"][l]).abs().max()) for l in fast.details["layers"])
    neurons = sum(len(fast.details["scores"][l]) for l in fast.details["layers"])
    return {"layers": fast.details["layers"], "neurons": neurons, "values": fast.details["steps"],
            "inputs": fast.details["samples"], "batched_s": t_b, "loop_s": t_l, "speedup": t_l / t_b,
            "curves_max_diff": diff, "same_ranking": fast.details["ranking"] == slow.details["ranking"]}


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
                     f"same ranking: {i['same_ranking']} |")
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
