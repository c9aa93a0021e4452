"""Benchmark: `property-tune` (netmend's sampling-based safety fine-tuning) on CARE's two ACAS Xu cases.

    python benchmarks/property_tune.py                       # N2,9 φ8 and N3,3 strengthened φ2, seed 0
    python benchmarks/property_tune.py --seeds 0 1 2 --cases n33-phi2s
    python benchmarks/property_tune.py --method property-patch --seeds 0 1 2   # results/property_patch.*
    python benchmarks/property_tune.py --method property-patch --networks all --property phi2-strengthened --verify \
        --out benchmarks/results/property_patch-phi2s-all     # every ACAS Xu network the verifier finds violated

The same networks, properties, defect options and metrics as benchmarks/care.py (violation rate on 10⁶ uniform box
samples, the metric falsifier's hits with its own seed, held-out counterexamples, fidelity outside the box), so the
rows sit beside CARE's in benchmarks/results/care.md. Writes <out>.csv and <out>.md.
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

import netmend
from care import DATA, safety_case
from netmend.verify import verify

CASES = {"n29-phi8": safety_case("2_9", "8"), "n33-phi2s": safety_case("3_3", "phi2-strengthened")}
METRICS = ["violation_rate", "counterexamples_found", "heldout_violation_rate", "fidelity"]


def _number(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def write_markdown(rows: list[dict], args) -> None:
    pct = lambda v: f"{100 * v:.4g}"   # noqa: E731
    what = {"property-tune": "netmend's sampling-based safety fine-tuning",
            "property-patch": "netmend's local patch: added neurons act inside the box only, every weight kept"}
    lines = [f"# {args.method} on ACAS Xu ({what[args.method]})", "",
             f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, {args.threads} thread(s), "
             f"device {args.device}; seeds {sorted({r['seed'] for r in rows})}; preset defaults. Last command: "
             f"`python benchmarks/property_tune.py {' '.join(sys.argv[1:])}`. Rates in %. Changed weights: for "
             "property-patch, the parameters it added (no original weight changes).", "",
             "| case | seed | violation rate (10⁶ uniform) | falsifier hits | held-out violations | fidelity outside the box "
             "| repair s | steps | changed weights | verifier after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['seed']} | {pct(r['violation_rate_before'])} → {pct(r['violation_rate_after'])} | "
                     f"{r['counterexamples_found_before']} → {r['counterexamples_found_after']} | "
                     f"{pct(r['heldout_violation_rate_before'])} → {pct(r['heldout_violation_rate_after'])} | "
                     f"{pct(r['fidelity_before'])} → {pct(r['fidelity_after'])} | {r['repair_s']} | {r['steps']} | "
                     f"{r['changed_weights']} | {r.get('verified', '') or '—'} {r.get('verify_s', '') or ''} |")
    lines.append("")
    if getattr(args, "skipped", None):
        lines += [f"Not repaired, the verifier's answer on the input network: {'; '.join(args.skipped)}.", ""]
    for case in dict.fromkeys(r["case"] for r in rows):
        sub = [r for r in rows if r["case"] == case]
        met = [r["seed"] for r in sub if r["violation_rate_after"] == 0 and r["counterexamples_found_after"] == 0
               and r["heldout_violation_rate_after"] < 0.01 and r["fidelity_after"] >= 0.99]
        lines.append(f"- {case}: the issue's floors (0 in 10⁶, no falsifier hit, held-out < 1 %, fidelity ≥ 99 %) met "
                     f"on seeds {met} of {[r['seed'] for r in sub]}")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=None, help=f"of {list(CASES)} (default: all of them)")
    ap.add_argument("--networks", default=None, help="'all': instead of the cases, every ACAS Xu network with "
                                                     "--property (skipped where the verifier proves it)")
    ap.add_argument("--property", default="phi2-strengthened", help="with --networks")
    ap.add_argument("--verify", action="store_true", help="verify each input network (skip it unless violated) "
                                                          "and each repaired one (60 s)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="property-tune", choices=["property-tune", "property-patch"])
    ap.add_argument("--out", type=Path, default=None, help="default: results/property_tune (property-tune) or "
                                                          "results/property_patch")
    ap.add_argument("--merge", action="store_true", help="keep the (case, seed) rows of the existing <out>.csv not rerun")
    args = ap.parse_args(argv)
    if args.networks == "all":
        for a in range(1, 6):
            for b in range(1, 10):
                CASES[f"n{a}{b}-{args.property}"] = safety_case(f"{a}_{b}", args.property)
        args.cases = [c for c in CASES if c.startswith("n") and c.endswith(f"-{args.property}") and c[1:3].isdigit()
                      and len(c.split("-")[0]) == 3]
    elif args.networks is not None:
        raise SystemExit("--networks takes 'all'")
    args.cases = args.cases or list(CASES)
    args.skipped = []
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if args.out is None:
        args.out = Path(__file__).parent / "results" / args.method.replace("-", "_")
    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA}")
    rows = []
    for seed in args.seeds:
        for name in args.cases:
            t0 = time.perf_counter()
            model, defect = CASES[name](args, seed)
            setup = time.perf_counter() - t0
            if args.verify and (v0 := verify(model, defect.prop, timeout=60, seed=seed)).status != "violated":
                print(f"{name}: the verifier says {v0.status} on the input network: nothing to repair", flush=True)
                args.skipped.append(f"{name} (seed {seed}): {v0.status}")
                continue
            res = netmend.api.repair(model, defect, method=args.method, seed=seed, device=args.device)
            row = {"case": name, "seed": seed, "setup_s": round(setup, 1), "repair_s": round(res.repair_seconds, 1),
                   "steps": res.edit.meta.get("steps", "—"), "changed_weights": res.edit.num_changed()}
            for k in METRICS:
                row[f"{k}_before"], row[f"{k}_after"] = res.before[k], res.after[k]
            if args.verify:
                v = verify(res.model, defect.prop, timeout=60, seed=seed)
                row["verified"], row["verify_s"] = v.status, round(v.seconds, 2)
            rows.append(row)
            print(row, flush=True)
    if not rows:
        raise SystemExit("no case was repaired")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.with_suffix(".csv").is_file():
        done = {(r["case"], r["seed"]) for r in rows}
        with open(args.out.with_suffix(".csv"), newline="") as f:
            old = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
        rows = sorted([r for r in old if (r["case"], r["seed"]) not in done] + rows,
                      key=lambda r: (list(CASES).index(r["case"]), r["seed"]))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_markdown(rows, args)


if __name__ == "__main__":
    main()
