"""Benchmark: repair every ACAS Xu instance the verifier finds violated, and prove each repair.

    python benchmarks/acasxu_all.py                        # every violated row of results/verify_acasxu.csv
    python benchmarks/acasxu_all.py --instances 55,63 --seed 0
    python benchmarks/acasxu_all.py --report               # rewrite the .md from the CSV only
    python benchmarks/acasxu_all.py --method property-patch   # the local patch: results/acasxu_all-property-patch.*

A thin wrapper over `netmend bench`. It writes one grid (<out>-bench/acasxu.toml): every (network, property) that
`benchmarks/verify_acasxu.py` found violated is a `models` entry (the network's .nnet file, for its input domain,
with the property as its own defect option), and the method runs with `certify = true`. So each cell is
`netmend.certify.certified_repair`: the repair, the acceptance gate, and the complete verifier on the repaired
model, with up to --rounds more repairs from the verifier's counterexamples. The grid runs on --workers local
workers, and a rerun resumes it. This script then reads each cell's run folder into one row per instance:
- verified after the repair or not;
- fidelity: agreement with the original advisory on 10⁵ fresh domain samples outside the property's box (the
  defect's fidelity metric, seed + 4);
- the violation rate on 10⁶ uniform box samples;
- the parameter change: ‖ΔW‖/‖W‖ over the edited weights, and the weights changed;
- seconds: repair, verification, and the cell in all.

For a rejected candidate the row has the candidate's numbers. Rows go to results/acasxu_all<suffix>.csv; --report
rewrites the .md from it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from care import nnet_path  # noqa: E402  (this folder is on sys.path when a benchmark runs as a script)

DATA = ROOT.parent / "shared" / "data" / "acasxu"
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ["index", "network", "property", "seed", "verified", "verify_status", "accepted", "fidelity",
          "violation_rate_before", "violation_rate_after", "falsifier_before", "falsifier_after", "rel_change",
          "changed_weights", "steps", "bound_rounds", "repair_s", "verify_s", "total_s", "reason"]


METHOD_TEXT = {
    "property-tune": "`property-tune` (sampled steps on fresh box / domain points, then bound-guided rounds: the "
                     "verifier is asked, and while it does not prove the property, steps with a hinge on the CROWN lower "
                     "bound of each cell of a partition of the box)",
    "property-patch": "`property-patch` (every original weight kept; added neurons correct the outputs inside the "
                      "property's box only: zero past a 10⁻⁴-wide band around it, so the advisory cannot change there; "
                      "safe in the box by construction)",
}


def violated_instances(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "violated"]


def nnet_of(inst: dict) -> Path:
    return nnet_path(inst["network"].lstrip("N").replace(",", "_"))


def grid_text(todo: list[dict], args) -> str:
    """The grid: one `models` entry per instance (its network file, its property), the method certified."""
    lines = [f'title = "Every violated ACAS Xu instance, {args.method} under certify"', f"seeds = [{args.seed}]",
             f'data_dir = "{DATA.parent}"', "models = ["]
    lines += [f'  {{ folder = "{nnet_of(i)}", defect = {{ property = "{i["property"]}" }} }},' for i in todo]
    lines += ["]", "", f'[methods."{args.method}"]', "certify = true", f"certify_rounds = {args.rounds}",
              f"verify_timeout = {float(args.verify_timeout)}", ""]
    return "\n".join(lines)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def rel_change(folder: Path, edit_file: str, model_is_after: bool) -> tuple[str, int, dict]:
    """(‖ΔW‖/‖W‖ of the original weights, weights changed, the edit's metadata) from a run folder's files."""
    from safetensors.torch import load_file

    from netmend.edit import Edit

    edit = Edit.load(folder / edit_file)
    if edit.layers is not None:                # property-patch: no weight changed, parameters added
        return "added", edit.num_changed(), edit.meta
    weights = load_file(str(folder / "model.safetensors"))
    num = den = 0.0
    for name, d in edit.deltas.items():
        w = weights[name].double() - (d.double() if model_is_after else 0)    # the weights before the repair
        num += float(d.double().pow(2).sum())
        den += float(w.pow(2).sum())
    return (f"{(num / den) ** 0.5:.4g}" if den else "0"), edit.num_changed(), edit.meta


def row_of(inst: dict, res, seed: int) -> dict:
    """The table's row for one instance, from its cell (a `netmend.bench.CellResult`): its run folder, or its
    one-line failure."""
    base = {"index": inst["index"], "network": inst["network"], "property": inst["property"], "seed": seed}
    if res.status != "ok":
        return {**base, "verified": False, "accepted": False, "reason": res.error or "not run"}
    run = res.run
    met, cfg = _json(run / "metrics.json"), _json(run / "config.json")
    accepted = bool(met.get("accepted"))
    after = met.get("candidate_after") or met["after"]          # a rejected candidate: its own numbers
    before = met["before"]
    candidate = (run / "candidate-edit.safetensors").is_file()
    rel, changed, meta = rel_change(run, "candidate-edit.safetensors" if candidate else "edit.safetensors",
                                    model_is_after=not candidate)
    cert = cfg.get("certify") or {}
    return {**base, "verified": bool(met["after"].get("verified")), "verify_status": met["after"].get("verify_status"),
            "accepted": accepted, "fidelity": round(after["fidelity"], 5),
            "violation_rate_before": before["violation_rate"], "violation_rate_after": after["violation_rate"],
            "falsifier_before": before["counterexamples_found"], "falsifier_after": after["counterexamples_found"],
            "rel_change": rel, "changed_weights": changed, "steps": meta.get("steps") or "",
            "bound_rounds": ";".join(r.get("verify", "skip") for r in meta.get("bound_rounds", [])),
            "repair_s": round(cert.get("repair_seconds", 0.0), 1), "verify_s": round(cert.get("verify_seconds", 0.0), 1),
            "total_s": round(res.seconds, 1), "reason": (met.get("gate") or {}).get("reason", "")}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_report(rows: list[dict], args, wanted: int) -> None:
    rows = sorted(rows, key=lambda r: int(r["index"]))
    ver = [r for r in rows if r["verified"] == "True"]
    ran = [r for r in rows if r.get("fidelity")]           # rows of instances the repair ran on (not a failed one)
    fid = [float(r["fidelity"]) for r in ran]
    lines = ["# Repairing every violated ACAS Xu instance, each repair proved by the verifier", "",
             f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores shared with other jobs, "
             f"torch {torch.__version__}, CPU, "
             + ("one torch thread per instance, two instances at a time (measured before this script ran through "
                "`netmend bench`)" if args.method == "property-tune" else
                f"`netmend bench` with {args.workers} worker(s) of one torch thread each") + f". Seed {args.seed}. Command: `python benchmarks/acasxu_all.py "
             f"--seed {args.seed}" + ("" if args.method == "property-tune" else f" --method {args.method}")
             + "` (the violated rows of results/verify_acasxu.csv).", "",
             f"Method: {METHOD_TEXT.get(args.method, f'`{args.method}`')}, under `certified_repair` (the complete "
             f"verifier on the repaired model; up to {args.rounds} more repair(s) with its counterexamples; verifier "
             f"timeout {args.verify_timeout} s). "
             "Fidelity: agreement with the original advisory on 10⁵ fresh domain samples outside the property's box "
             "(inside-box satisfying samples where the box covers the domain, φ7). Violation rate: 10⁶ uniform box "
             "samples. Change: ‖ΔW‖/‖W‖ over the edited parameters (\"added\": no weight changed; the weights column "
             "counts the parameters the patch added).", ""]
    if ran:
        acc = [r for r in rows if r["accepted"] == "True"]
        lines += [f"**{len(ver)} of {len(rows)} repaired instances verified** ({wanted} violated instances in all); "
                  f"**{len(acc)} accepted** by the acceptance gate (a verified candidate is still rejected when the "
                  "gate's own fresh samples outside the box lose more than 1 point of fidelity). "
                  f"Fidelity: mean {100 * statistics.mean(fid):.2f} %, min {100 * min(fid):.2f} %, max "
                  f"{100 * max(fid):.2f} %. Time per instance (repair + verification): median "
                  f"{statistics.median(float(r['total_s']) for r in ran):.0f} s, max "
                  f"{max(float(r['total_s']) for r in ran):.0f} s." + (f" {len(rows) - len(ran)} instance(s) failed "
                  "before a repair (reason in the table)." if len(ran) < len(rows) else ""), "",
                  "Anchors on the same benchmark: VeRe (ICSE 2024) all 36 unsafe tasks at 99.87 % generalisation; "
                  "Veritex 35/35 unsafe networks at accuracy min / mean / max 98.74 / 99.70 / 100 %.", "",
                  "| # | network | property | verified | fidelity % | violation rate % (10⁶) | falsifier hits | ‖ΔW‖/‖W‖ "
                  "| weights changed | steps | verifier in repair | repair s | verify s | gate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if not r.get("fidelity"):
                lines.append(f"| {r['index']} | {r['network']} | {r['property']} | failed | | | | | | | | | | "
                             f"{r['reason']} |")
                continue
            gate = "accepted" if r["accepted"] == "True" else f"rejected: {r['reason']}"
            lines.append(f"| {r['index']} | {r['network']} | {r['property']} | {r['verify_status']} | "
                         f"{100 * float(r['fidelity']):.2f} | {100 * float(r['violation_rate_before']):.4g} → "
                         f"{100 * float(r['violation_rate_after']):.4g} | {r['falsifier_before']} → {r['falsifier_after']} | "
                         f"{r['rel_change']} | {r['changed_weights']} | {r['steps']} | {r['bound_rounds']} | "
                         f"{r['repair_s']} | {r['verify_s']} | {gate} |")
    out = RESULTS / f"acasxu_all{args.suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


def main() -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instances", default="", help="comma-separated instance numbers (the verify table's #)")
    ap.add_argument("--rounds", type=int, default=1, help="certified_repair rounds after the first repair")
    ap.add_argument("--verify-timeout", type=float, default=60.0)
    ap.add_argument("--method", default="property-tune", choices=sorted(METHOD_TEXT))
    ap.add_argument("--suffix", default=None, help="results/acasxu_all<suffix>.csv/.md (default: none for "
                                                    "property-tune, -<method> otherwise)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="netmend bench workers (one torch thread each)")
    ap.add_argument("--bench", default=None, help="the grid's folder (default benchmarks/runs/acasxu_all<suffix>-bench; "
                                                  "a rerun resumes it)")
    args = ap.parse_args()
    if args.suffix is None:
        args.suffix = "" if args.method == "property-tune" else f"-{args.method}"
    torch.set_num_threads(1)
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA}")
    todo = violated_instances(RESULTS / "verify_acasxu.csv")
    wanted = len(todo)
    if args.instances:
        keep = {s.strip() for s in args.instances.split(",")}
        todo = [r for r in todo if r["index"] in keep]
    path = RESULTS / f"acasxu_all{args.suffix}.csv"
    if args.report:
        write_report(read_rows(path), args, wanted)
        return
    from netmend.bench import load_grid, read_cells, run_bench
    from netmend.bench.grid import defect_label

    bench = Path(args.bench or RESULTS.parent / "runs" / f"acasxu_all{args.suffix}-bench")
    bench.mkdir(parents=True, exist_ok=True)
    grid = bench / "acasxu.toml"
    grid.write_text(grid_text(todo, args))
    run_bench(grid, bench / "out", workers=args.workers, log=lambda *a: print(*a, flush=True))
    cells = {(Path(r.coords["model"]).name, r.coords["defect"]): r for r in read_cells(bench / "out", load_grid(grid))}
    new = [row_of(i, cells[nnet_of(i).name, defect_label({"property": i["property"]})], args.seed) for i in todo]
    keep = {(str(r["index"]), str(r["seed"])) for r in new}
    rows = [r for r in read_rows(path) if (r["index"], r["seed"]) not in keep] + [{k: str(v) for k, v in r.items()}
                                                                                for r in new]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (int(r["index"]), int(r["seed"]))))
    write_report(rows, args, wanted)


if __name__ == "__main__":
    main()
