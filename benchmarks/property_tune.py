"""Benchmark: `property-tune` (netmend's sampling-based safety fine-tuning) on CARE's two ACAS Xu cases.

    python benchmarks/property_tune.py                       # N2,9 φ8 and N3,3 strengthened φ2, seed 0
    python benchmarks/property_tune.py --seeds 0 1 2 --cases n33-phi2s
    python benchmarks/property_tune.py --method property-patch --seeds 0 1 2   # results/property_patch.*
    python benchmarks/property_tune.py --method property-patch --networks all --property phi2-strengthened --verify \
        --out benchmarks/results/property_patch-phi2s-all     # every ACAS Xu network the verifier finds violated

The same networks, properties, defect options and metrics as benchmarks/care.py (violation rate on 10⁶ uniform box
samples, the metric falsifier's hits with its own seed, held-out counterexamples, fidelity outside the box), so the
rows sit beside CARE's in benchmarks/results/care.md. A thin wrapper over `netmend bench`: one grid
(benchmarks/runs/<out name>-bench/property.toml: each case's network file with its property × the method × the seeds; with --verify
under certify), run on --workers local workers and resumed on a rerun, then one row per case and seed read from the
cells' run folders. Writes <out>.csv and <out>.md.
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
from pathlib import Path

import torch

from care import DATA, nnet_path
from netmend.bench.table import read_csv

CASES = {"n29-phi8": ("2_9", "8"), "n33-phi2s": ("3_3", "phi2-strengthened")}     # name -> (network, property)
METRICS = ["violation_rate", "counterexamples_found", "heldout_violation_rate", "fidelity"]


def write_markdown(rows: list[dict], args) -> None:
    pct = lambda v: "—" if v is None or v != v else f"{100 * v:.4g}"   # noqa: E731  (none held out: NaN / null)
    what = {"property-tune": "netmend's sampling-based safety fine-tuning",
            "property-patch": "netmend's local patch: added neurons act inside the box only, every weight kept"}
    lines = [f"# {args.method} on ACAS Xu ({what[args.method]})", "",
             f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, `netmend bench` with "
             f"{args.workers} worker(s) of one torch thread each, device {args.device}; seeds {sorted({r['seed'] for r in rows})}; preset defaults. Last command: "
             f"`python benchmarks/property_tune.py {' '.join(sys.argv[1:])}`. Rates in %. Changed weights: for "
             "property-patch, the parameters it added (no original weight changes).", "",
             "Each row shows what the method returned; `gate` says whether netmend's acceptance gate keeps it (a "
             "rejected repair is handed back as the input model).", "",
             "| case | seed | violation rate (10⁶ uniform) | falsifier hits | held-out violations | fidelity outside the box "
             "| repair s | steps | changed weights | verifier after | gate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['seed']} | {pct(r['violation_rate_before'])} → {pct(r['violation_rate_after'])} | "
                     f"{r['counterexamples_found_before']} → {r['counterexamples_found_after']} | "
                     f"{pct(r['heldout_violation_rate_before'])} → {pct(r['heldout_violation_rate_after'])} | "
                     f"{pct(r['fidelity_before'])} → {pct(r['fidelity_after'])} | {r['repair_s']} | {r['steps']} | "
                     f"{r['changed_weights']} | {r.get('verified', '') or '—'} {r.get('verify_s', '') or ''} | "
                     f"{r.get('gate', '')} |")
    lines.append("")
    if getattr(args, "skipped", None):
        lines += [f"Not repaired: {'; '.join(args.skipped)}.", ""]
    for case in dict.fromkeys(r["case"] for r in rows):
        sub = [r for r in rows if r["case"] == case]
        met = [r["seed"] for r in sub if r["violation_rate_after"] == 0 and r["counterexamples_found_after"] == 0
               and (r["heldout_violation_rate_after"] or 0) < 0.01 and r["fidelity_after"] >= 0.99]
        lines.append(f"- {case}: the issue's floors (0 in 10⁶, no falsifier hit, held-out < 1 %, fidelity ≥ 99 %) met "
                     f"on seeds {met} of {[r['seed'] for r in sub]}")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def grid_text(args) -> str:
    """One `netmend bench` grid: each case's network file with its property × the method × the seeds; with
    --verify, the method under certify (the verifier on the input when the falsifier finds nothing, and on the
    result; no further rounds)."""
    lines = [f'title = "{args.method} on ACAS Xu"', f"seeds = {list(args.seeds)}", f'data_dir = "{DATA}"',
             f'device = "{args.device}"', "models = ["]
    lines += [f'  {{ folder = "{nnet_path(CASES[c][0])}", defect = {{ property = "{CASES[c][1]}" }} }},' for c in args.cases]
    lines += ["]", "", f'[methods."{args.method}"]']
    if args.verify:
        lines += ["certify = true", "certify_rounds = 0", "verify_timeout = 60.0"]
    return "\n".join(lines) + "\n"


def row_of(name: str, res, args) -> dict | None:
    """One case and seed's row from its cell's run folder (`res`: a `netmend.bench.CellResult`; None, and a line in
    `args.skipped`, when it failed or did not run)."""
    import json

    from netmend.edit import Edit

    if res.status != "ok":
        args.skipped.append(f"{name} (seed {res.seed}): {res.error or 'not run'}")
        return None
    run = res.run
    met = json.loads((run / "metrics.json").read_text())
    candidate = (run / "candidate-edit.safetensors").is_file()       # the gate rejected it: the method's own result
    edit = Edit.load(run / ("candidate-edit.safetensors" if candidate else "edit.safetensors"))
    after = met.get("candidate_after") or met["after"]
    gate = "accepted" if met.get("accepted") else "rejected: " + ((met.get("gate") or {}).get("reason") or "")
    row = {"case": name, "seed": res.seed, "repair_s": round(met["repair_seconds"], 1),
           "steps": edit.meta.get("steps", "—"), "changed_weights": edit.num_changed(), "gate": gate}
    for k in METRICS:
        row[f"{k}_before"], row[f"{k}_after"] = met["before"][k], after[k]
    if args.verify:
        cert = json.loads((run / "config.json").read_text()).get("certify") or {}
        row["verified"], row["verify_s"] = after.get("verify_status"), round(cert.get("verify_seconds", 0), 2)
    return row


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
    ap.add_argument("--workers", type=int, default=2, help="netmend bench workers (one torch thread each)")
    ap.add_argument("--method", default="property-tune", choices=["property-tune", "property-patch"])
    ap.add_argument("--out", type=Path, default=None, help="default: results/property_tune (property-tune) or "
                                                          "results/property_patch")
    ap.add_argument("--merge", action="store_true", help="keep the (case, seed) rows of the existing <out>.csv not rerun")
    args = ap.parse_args(argv)
    if args.networks == "all":
        for a in range(1, 6):
            for b in range(1, 10):
                CASES[f"n{a}{b}-{args.property}"] = (f"{a}_{b}", args.property)
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
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA}")
    from netmend.bench import load_grid, read_cells, run_bench
    from netmend.bench.grid import defect_label

    bench = Path(__file__).parent / "runs" / f"{args.out.name}-bench"      # runs/: not in git
    bench.mkdir(parents=True, exist_ok=True)
    grid = bench / "property.toml"
    grid.write_text(grid_text(args))
    run_bench(grid, bench / "out", workers=args.workers, log=lambda *a: print(*a, flush=True))
    names = {(nnet_path(CASES[c][0]).name, defect_label({"property": CASES[c][1]})): c for c in args.cases}
    rows = []
    for res in read_cells(bench / "out", load_grid(grid)):
        name = names[Path(res.coords["model"]).name, res.coords["defect"]]
        row = row_of(name, res, args)
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: (r["seed"], args.cases.index(r["case"])))
    if not rows:
        raise SystemExit("no case was repaired")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.out.with_suffix(".csv").is_file():
        done = {(r["case"], r["seed"]) for r in rows}
        old = read_csv(args.out.with_suffix(".csv"))
        rows = sorted([r for r in old if (r["case"], r["seed"]) not in done] + rows,
                      key=lambda r: (list(CASES).index(r["case"]), r["seed"]))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_markdown(rows, args)


if __name__ == "__main__":
    main()
