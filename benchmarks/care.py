"""Benchmark: CARE (causal localisation + PSO) on its NN1–NN9-style table, before/after, with timings.

    python benchmarks/care.py                          # every case, seed 0
    python benchmarks/care.py --cases census-sex fmnist-badnets n29-phi8
    python benchmarks/care.py --seeds 0 1 2 --threads 2
    python benchmarks/care.py --cases n29-phi8 n33-phi2s --merge   # rerun two cases, keep the other rows

Cases: fairness Census×{sex, race, age}, Credit×{sex, age}, Bank×{age} (netmend's 64-32-16-8-4 MLP per CSV);
backdoor BadNets 3×3, 10% poisoning, target 0, small CNN on Fashion-MNIST and MNIST-5k; safety ACAS Xu
N2,9 φ8 (official box) and N3,3 strengthened φ2. Trained models are cached under --cache (a Fashion-MNIST
model already trained by benchmarks/rectify.py under /work/cache/models/rectify is reused as is).
Writes <out>.csv (one row per case and seed), <out>.md (the table, machine, seeds) and <out>.json (scales, traces).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import netmend
from netmend.modelio import load_model_folder, save_model_folder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Case:
    name: str
    kind: str
    build: Callable[[argparse.Namespace, int], tuple[Any, Any]]     # (args, seed) -> (model, defect)
    locate: dict[str, Any] = field(default_factory=dict)
    repair: dict[str, Any] = field(default_factory=dict)
    paper: str = ""


def _cached(folder: Path, train: Callable[[], tuple[Any, dict]]):
    if not (folder / "model.json").is_file():
        t0 = time.perf_counter()
        model, info = train()
        print(f"trained {folder.name} in {time.perf_counter() - t0:.0f}s", flush=True)
        save_model_folder(folder, model, info)
    return load_model_folder(folder)


def fairness_case(dataset: str, protected: str):
    def build(args, seed):
        from netmend.defects.fairness import FairnessOptions, fairness_from_info, train_fairness

        model, info = _cached(args.cache / f"{dataset}-mlp-s{seed}", lambda: train_fairness(dataset, seed=seed))
        return model, fairness_from_info(info, FairnessOptions(protected=protected, seed=seed), model=model)

    return build


def backdoor_case(dataset: str):
    def build(args, seed):
        from netmend.data.triggers import TriggerSpec
        from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info
        from netmend.train import train_backdoored

        shared = args.cache.parent / "rectify" / f"{dataset}-small-cnn-badnets-s{seed}"    # same recipe
        folder = shared if (shared / "model.json").is_file() else args.cache / f"{dataset}-small-cnn-badnets-s{seed}"
        model, info = _cached(folder, lambda: train_backdoored(
            dataset, "small-cnn", TriggerSpec(kind="badnets", size=3), target=0, poison_rate=0.1,
            cfg=netmend.train.TrainConfig(seed=seed)))
        return model, backdoor_from_info(info, BackdoorOptions(seed=seed))

    return build


def nnet_path(net: str) -> Path:
    """ACAS Xu network N<a>,<b> ("a_b") as its .nnet file in the data folder."""
    return DATA / "acasxu" / "nnet" / f"ACASXU_run2a_{net}_batch_2000.nnet"


def safety_case(net: str, prop: str):
    def build(args, seed):
        from netmend.defects.safety import SafetyOptions, safety_from_info
        from netmend.zoo.acasxu import load_nnet

        model, info = load_nnet(nnet_path(net))
        return model, safety_from_info(info, SafetyOptions(property=prop, seed=seed), model=model)

    return build


# Fairness (netmend deviations, each measured; CARE's own settings stay available as options):
#  - keep 13: CARE's commented-out repair_num; its default 3 barely moves the DI rate;
#  - inputs + score "drop": the input features are candidate neurons too and neurons are ranked by how far an
#    intervention can lower dy below its unintervened value (CARE: hidden layers only, mean of the curve; with
#    those the test-split DI reduction stayed at 9–49% per case, seed 0, whatever the objective);
#  - objective "pool" (FairnessOptions): the repair pool's rows + the DI evidence (CARE: 200 DI instances only);
#  - alpha 0.9 on that natural population (DI ~10%, error ~16%: 0.1·ΔDI vs 0.9·Δerror), particles 1.. within
#    identity ± 0.3, the candidate with the lowest validation cost kept (PSOConfig.select).
# Backdoor: the method's own defaults (locate/causal.py, repair/pso.py), which deviate from CARE: neurons are the
# flattened conv features feeding fc1 (64×7×7 channel × position units; CARE: one dense layer), 30 kept (CARE 5),
# α 0.5 (CARE 0.2), validation choice on the repair split. Chosen on dev models (FMNIST seed 1, MNIST-5k seed 7);
# CARE's own settings: CARE_BD_LOCATE='{"cnn_layer": "head", "keep": 5}' CARE_BD_REPAIR='{"alpha": 0.2}'.
BD_LOCATE = json.loads(os.environ.get("CARE_BD_LOCATE", "{}"))
BD_REPAIR = json.loads(os.environ.get("CARE_BD_REPAIR", "{}"))
FAIR_HIDDEN = os.environ.get("CARE_FAIR_HIDDEN") == "1"
FAIR_LOCATE = {"keep": 13} if FAIR_HIDDEN else {"keep": 13, "inputs": True, "score": "drop"}
FAIR_REPAIR = {"alpha": 0.5, "spread": 0.3} if FAIR_HIDDEN else {"alpha": 0.9, "spread": 0.3}

# Safety: the defect's objective adds 4000 outside-box samples that keep the original advisory (SafetyOptions.outside)
# and a 0.001 decision margin on the evidence (objective_margin); PSO runs up to 3 falsify → repair → falsify rounds
# (PSOConfig.rounds, repair-only seeds); alpha 0.5 (CARE: 0.3 N2,9, 0.1 N3,3), particles 1.. within identity ± 1,
# ftol_iter 20, validation choice. N3,3: causal ranking over the drawndown box samples only (box_only, as CARE; the
# default also mixes in the objective's outside-box keep samples) and alpha 0.8: fidelity outside the box 88.0%
# (27 neurons, 0.5) → 90.7% (50, 0.8) → 92.9% (box_only, 27, 0.8) on repair-side diagnostics (seeds + 30..32, never
# the metric seeds); N2,9 keeps the defaults (27, 0.5: 99.2% there, box_only 99.0%). N3,3 also weights each neuron's
# score by its inactivity on the outside-box keep samples (CausalConfig.specific = 1): fidelity on the dev seeds
# 30 / 31 / 32 went 89.5 / 91.9 / 90.2% → 93.9 / 92.4 / 90.7%, falsifier hits 0 / 46 / 0 → 0 / 0 / 0 (exponent 2:
# 92.6% on seed 30, 4: 90.9%; 20000 outside samples instead of 4000: 93.3 / 88.4 / 95.0%). Gradient-fitted scales
# of all 300 hidden neurons reach only ~97% there (benchmarks/care_ceiling.py): 99% is out of reach of scaling.
SAFE_REPAIR = json.loads(os.environ.get("CARE_SAFE_REPAIR", '{"alpha": 0.5, "spread": 1.0, "ftol_iter": 20}'))
SAFE_N33_LOCATE = {"outputs": [0], "box_only": True, "specific": 1.0}
SAFE_N33_REPAIR = {**SAFE_REPAIR, "alpha": 0.8}

CASES = [
    Case("census-sex", "fairness", fairness_case("census", "sex"), locate=FAIR_LOCATE, repair=FAIR_REPAIR, paper="NN1"),
    Case("census-race", "fairness", fairness_case("census", "race"), locate=FAIR_LOCATE, repair=FAIR_REPAIR, paper="NN1"),
    Case("census-age", "fairness", fairness_case("census", "age"), locate=FAIR_LOCATE, repair=FAIR_REPAIR, paper="NN1"),
    Case("credit-sex", "fairness", fairness_case("credit", "sex"), locate=FAIR_LOCATE, repair=FAIR_REPAIR, paper="NN2"),
    Case("credit-age", "fairness", fairness_case("credit", "age"), locate=FAIR_LOCATE, repair=FAIR_REPAIR, paper="NN2"),
    Case("bank-age", "fairness", fairness_case("bank", "age"), locate=FAIR_LOCATE, repair=FAIR_REPAIR, paper="NN3"),
    Case("mnist5k-badnets", "backdoor", backdoor_case("mnist-5k"), locate=BD_LOCATE, repair=BD_REPAIR, paper="NN5"),
    Case("fmnist-badnets", "backdoor", backdoor_case("fashion-mnist"), locate=BD_LOCATE, repair=BD_REPAIR,
         paper="NN6"),
    Case("n29-phi8", "safety", safety_case("2_9", "8"), repair=SAFE_REPAIR, paper="NN7"),
    Case("n33-phi2s", "safety", safety_case("3_3", "phi2-strengthened"), locate=SAFE_N33_LOCATE,
         repair=SAFE_N33_REPAIR, paper="NN8"),
]

HEADLINE = {   # (metric, lower is better) per kind
    "fairness": ["clean_accuracy", "discrimination_rate", "discrimination_rate_uniform", "discrimination_rate_evidence"],
    "backdoor": ["clean_accuracy", "asr", "robust_accuracy"],
    "safety": ["violation_rate", "counterexamples_found", "heldout_violation_rate", "fidelity"],
}


def run_case(case: Case, args, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    t0 = time.perf_counter()
    model, defect = case.build(args, seed)
    setup = time.perf_counter() - t0
    res = netmend.api.repair(model, defect, method="care", locate_options=case.locate, repair_options=case.repair,
                             seed=seed, device=args.device)
    row: dict[str, Any] = {"case": case.name, "paper": case.paper, "kind": case.kind, "seed": seed,
                           "setup_s": round(setup, 2), "locate_s": round(res.locate_seconds, 2),
                           "repair_s": round(res.repair_seconds, 2), "care_s": round(res.seconds, 2),
                           "neurons": len(res.edit.meta["scales"]), "pso_iterations": res.edit.meta["iterations"],
                           "rounds": len(res.edit.meta.get("rounds", [])) or 1,
                           "best_cost": round(res.edit.meta["best_cost"], 5),
                           "identity_cost": round(res.edit.meta["identity_cost"], 5)}
    for k in HEADLINE[case.kind]:
        if k in res.before:
            row[f"{k}_before"], row[f"{k}_after"] = res.before[k], res.after[k]
    if case.kind == "fairness":
        for k in ("discrimination_rate", "discrimination_rate_uniform", "discrimination_rate_evidence"):
            b, a = res.before.get(k), res.after.get(k)
            if b:
                row[f"{k}_reduction"] = (b - a) / b
    detail = {"case": case.name, "seed": seed, "sites": [[s.layer, s.index, s.score] for s in res.sites],
              "scales": res.edit.meta["scales"], "trace": res.edit.meta["trace"], "before": res.summary()["before"],
              "after": res.summary()["after"], "defect": defect.describe()}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row, detail


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}" if abs(v) <= 1.0 else f"{v:.1f}"
    return str(v)


def write_markdown(rows: list[dict], path: Path, args) -> None:
    lines = ["# CARE benchmark (causal localisation + PSO)", "",
             f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, {args.threads} thread(s), "
             f"device {args.device}; seeds {args.seeds}. Rates in %, times in s. "
             f"Command: `python benchmarks/care.py {' '.join(sys.argv[1:])}`", "",
             f"Deviations from CARE's defaults (see the comments in benchmarks/care.py): fairness locate {FAIR_LOCATE}, "
             f"repair {FAIR_REPAIR}, objective 'pool' (repair-pool rows + DI evidence); safety repair {SAFE_REPAIR} "
             f"(N3,3: locate {SAFE_N33_LOCATE}, repair {SAFE_N33_REPAIR}) with 4000 outside-box keep samples and a "
             f"0.001 decision margin in the objective and up to 3 falsify → repair → falsify rounds on repair-only "
             f"seeds; backdoor locate {BD_LOCATE or 'netmend default'} repair "
             f"{BD_REPAIR or 'netmend default'} (default: flattened conv features, 30 neurons, alpha 0.5; CARE: one "
             f"dense layer, 5 neurons, alpha 0.2); PSO keeps the candidate with the lowest validation cost (fairness, "
             f"safety: the defect's validation objective; backdoor: the repair split's validation part).", ""]
    for kind in ("fairness", "backdoor", "safety"):
        sub = [r for r in rows if r["kind"] == kind]
        if not sub:
            continue
        metrics = [k for k in HEADLINE[kind] if f"{k}_before" in sub[0]]
        cols = ["case", "paper", "seed"] + [f"{k} {w}" for k in metrics for w in ("before", "after")]
        keys = ["case", "paper", "seed"] + [f"{k}_{w}" for k in metrics for w in ("before", "after")]
        if kind == "fairness":
            cols += ["DI reduction (test)", "DI reduction (uniform)"]
            keys += ["discrimination_rate_reduction", "discrimination_rate_uniform_reduction"]
        cols += ["neurons", "PSO iters", "locate s", "repair s", "CARE s"]
        keys += ["neurons", "pso_iterations", "locate_s", "repair_s", "care_s"]
        if kind == "safety":
            cols.insert(-3, "PSO runs")
            keys.insert(-3, "rounds")
        lines += [f"## {kind}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sub:
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) if k not in ("locate_s", "repair_s", "care_s", "seed",
                                                                           "neurons", "pso_iterations", "rounds")
                                           else str(r.get(k, "")) for k in keys) + " |")
        if kind == "fairness":
            red = [r["discrimination_rate_reduction"] for r in sub if "discrimination_rate_reduction" in r]
            red_u = [r["discrimination_rate_uniform_reduction"] for r in sub if "discrimination_rate_uniform_reduction" in r]
            loss = [100 * (r["clean_accuracy_before"] - r["clean_accuracy_after"]) for r in sub]
            if red:
                lines += ["", f"Mean discrimination-rate reduction: test split {100 * sum(red) / len(red):.1f}%, "
                              f"uniform samples {100 * sum(red_u) / max(1, len(red_u)):.1f}%; "
                              f"largest accuracy loss {max(loss):.2f} points."]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/models/care"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "care")
    ap.add_argument("--merge", action="store_true", help="keep the rows of cases not rerun from the existing <out>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA}")
    rows, details = [], []
    for seed in args.seeds:
        for case in (c for c in CASES if c.name in args.cases):
            row, detail = run_case(case, args, seed)
            rows.append(row)
            details.append(detail)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.with_suffix(".json").is_file():   # keep the other cases' rows from the last run
        done = {(r["case"], r["seed"]) for r in rows}
        old = json.loads(args.out.with_suffix(".json").read_text())
        order = {c.name: i for i, c in enumerate(CASES)}
        rows = sorted([r for r in old["rows"] if (r["case"], r["seed"]) not in done] + rows,
                      key=lambda r: (order.get(r["case"], 99), r["seed"]))
        details = sorted([d for d in old["details"] if (d["case"], d["seed"]) not in done] + details,
                         key=lambda d: (order.get(d["case"], 99), d["seed"]))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": netmend.api.versions(), "rows": rows,
                                                         "details": details}, indent=1, default=str))
    write_markdown(rows, args.out.with_suffix(".md"), args)
    print(f"wrote {args.out}.csv/.md/.json")


if __name__ == "__main__":
    main()
