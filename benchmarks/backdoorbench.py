"""Benchmark: BackdoorBench's comparison — every attack × every defence, in one run and one table.

    python benchmarks/backdoorbench.py                                   # the Fashion-MNIST grid, 2 workers
    python benchmarks/backdoorbench.py --grid benchmarks/grids/backdoorbench-cifar10.toml --workers 4
    python benchmarks/backdoorbench.py --tabulate OUT [OUT …]            # only rebuild the table from grid runs
    python benchmarks/backdoorbench.py --tabulate OUT --keep RESULTS.csv # an earlier table, OUT's cells replacing

A thin wrapper over `netmend bench` (the grid file says which attacks, defences and seeds): it runs the grid, or
resumes it, then writes the table BackdoorBench reports, per attack and as the mean over attacks: clean accuracy
(C-Acc), attack success rate (ASR), robust accuracy (R-Acc: stamped inputs still given their true class) and the
defence effectiveness rating DER = [max(0, ΔASR) − max(0, ΔC-Acc) + 1] / 2 (0.5: nothing changed, 1: ASR to 0 at
no accuracy cost), mean ± std over the seeds, plus repair seconds and how many runs netmend's acceptance gate
accepted. Each defence is judged by what it returned: a candidate the gate rejected is shown with its own
numbers (netmend would have handed back the input model instead), as the literature reports every defence.
Writes <results>.md and <results>.csv (default benchmarks/results/backdoorbench-<grid name>).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from netmend.bench import load_grid, read_cells
from netmend.metrics import defense_effectiveness_rating

HERE = Path(__file__).parent
METRICS = ("clean_accuracy", "asr", "robust_accuracy")


def read_rows(out: Path) -> list[dict]:
    """The cells of a `netmend bench` output, whether its run finished, is still running or was stopped (results.csv
    is rewritten only at the end of a run, the cell folders and failure records as each cell ends): the finished
    ones with their repair seconds and DER, then the failed ones."""
    rows = []
    for c in read_cells(out):
        r = {"cell": c.id, **c.coords, "status": c.status}
        if c.status != "ok":
            rows.append({**r, "error": c.error, "ok": False})
            continue
        r.update(c.row)
        before = {m: float(r[f"before_{m}"]) for m in METRICS}
        own = c.made
        after = {m: float(r[f"{own}_{m}"]) for m in METRICS}
        rows.append({**r, "ok": True, "before": before, "after_own": after, "der": defense_effectiveness_rating(before, after),
                     "repair_seconds": c.repair_seconds, "accepted": str(r["accepted"]) == "True"})
    return rows


def kept_rows(path: Path) -> list[dict]:
    """The cells of an earlier table's CSV, as `read_rows` gives them (for a rerun of only some methods' cells)."""
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            before = {m: float(r[f"before_{m}"]) for m in METRICS}
            after = {m: float(r[f"after_{m}"]) for m in METRICS}
            rows.append({"cell": f"{path.name}:{r['attack']}/{r['method']}/{r['seed']}", "attack": r["attack"],
                         "method": r["method"], "seed": int(r["seed"]), "ok": True, "before": before,
                         "after_own": after, "der": defense_effectiveness_rating(before, after),
                         "repair_seconds": float(r["repair_seconds"]) if r["repair_seconds"] else None,
                         "accepted": r["accepted"] == "True"})
    return rows


def merged(kept: list[dict], runs: list[list[dict]]) -> list[dict]:
    """One row per (attack, method, seed): a later source replaces an earlier one. Prints where a rerun's model
    measured other than the kept table's (CPU training is deterministic: the same recipe gives the same model)."""
    def key(r: dict) -> tuple:
        return r.get("attack"), r.get("method"), int(r.get("seed") or 0)

    old = {key(r): r for r in kept}
    by = dict(old)
    for r in (r for rows in runs for r in rows):
        k = key(r)
        if r["ok"] and k in old:
            drift = max(abs(r["before"][m] - old[k]["before"][m]) for m in METRICS)
            if drift > 1e-6:
                print(f"note: {k}: the model measured {drift:.2e} away from the kept table's", flush=True)
        by[k] = {**r, "seed": k[2]}
    return list(by.values())


def in_grid_order(rows: list[dict], grid: Path) -> list[dict]:
    """Rows ordered as the grid file lists attacks and methods, then by seed (cell folders sort by name)."""
    g = load_grid(grid).grid
    attacks, methods = list(g.attacks), list(g.methods)

    def key(r):
        return (attacks.index(r["attack"]) if r.get("attack") in attacks else len(attacks),
                methods.index(r["method"]) if r.get("method") in methods else len(methods), int(r.get("seed") or 0))
    return sorted(rows, key=key)


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [x * scale for x in values if x is not None]
    if not v:
        return "–"
    return f"{v[0]:.{digits}f}" if len(v) == 1 else f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def tables(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Markdown lines (one table per attack, then the mean over attacks) and the CSV rows behind them."""
    ok = [r for r in rows if r["ok"]]
    attacks = list(dict.fromkeys(r["attack"] for r in ok))
    methods = list(dict.fromkeys(r["method"] for r in ok))
    head = ("| method | seeds | gate accepted | C-Acc % | ASR % | R-Acc % | DER | repair s |\n"
            "|---|---|---|---|---|---|---|---|")
    lines, csv_rows = [], []
    for a in attacks:
        mine = [r for r in ok if r["attack"] == a]
        seeds = sorted({r["seed"] for r in mine}, key=int)
        base = {s: next(r["before"] for r in mine if r["seed"] == s) for s in seeds}
        lines += [f"## {a}", "", head,
                  f"| no defence | {len(seeds)} | – | {_ms([base[s]['clean_accuracy'] for s in seeds])} | "
                  f"{_ms([base[s]['asr'] for s in seeds])} | {_ms([base[s]['robust_accuracy'] for s in seeds])} | "
                  f"0.500 | – |"]
        for m in methods:
            g = [r for r in mine if r["method"] == m]
            if not g:
                continue
            lines.append(f"| {m} | {len(g)} | {sum(r['accepted'] for r in g)}/{len(g)} | "
                         f"{_ms([r['after_own']['clean_accuracy'] for r in g])} | {_ms([r['after_own']['asr'] for r in g])} | "
                         f"{_ms([r['after_own']['robust_accuracy'] for r in g])} | {_ms([r['der'] for r in g], 1, 3)} | "
                         f"{_ms([r['repair_seconds'] for r in g], 1, 1)} |")
            for r in g:
                csv_rows.append({"attack": a, "method": m, "seed": r["seed"], "accepted": r["accepted"],
                                 **{f"before_{k}": v for k, v in r["before"].items()},
                                 **{f"after_{k}": v for k, v in r["after_own"].items()},
                                 "der": r["der"], "repair_seconds": r["repair_seconds"]})
        lines.append("")
    lines += ["## Mean over attacks", "",
              "Each defence's per-attack means (over seeds), averaged over the attacks it ran on.", "",
              "| method | attacks | C-Acc loss (points) | ASR % | DER |", "|---|---|---|---|---|"]
    for m in methods:
        per = []
        for a in attacks:
            g = [r for r in ok if r["attack"] == a and r["method"] == m]
            if g:
                per.append((statistics.mean(r["before"]["clean_accuracy"] - r["after_own"]["clean_accuracy"] for r in g),
                            statistics.mean(r["after_own"]["asr"] for r in g), statistics.mean(r["der"] for r in g)))
        if per:
            lines.append(f"| {m} | {len(per)} | {100 * statistics.mean(p[0] for p in per):.2f} | "
                         f"{100 * statistics.mean(p[1] for p in per):.2f} | {statistics.mean(p[2] for p in per):.3f} |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {r['cell']}: {r.get('error', '')}" for r in failed]
    return lines, csv_rows


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=Path, default=HERE / "grids" / "backdoorbench-fashion-mnist.toml")
    p.add_argument("--out", type=Path, default=None, help="the grid's output folder (default /tmp/bb-<grid name>)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray", default=None, help="run the grid on a Ray cluster (auto | ADDRESS)")
    p.add_argument("--tabulate", type=Path, nargs="+", default=None,
                   help="only tabulate these finished (or partial) grid outputs (e.g. seeds run apart; a cell found "
                        "in several folders is taken from the last)")
    p.add_argument("--keep", type=Path, default=None,
                   help="an earlier table's CSV whose cells stand where the grid outputs hold none (rerun only the "
                        "methods a change touched: `netmend bench … --only`)")
    p.add_argument("--results", type=Path, default=None, help="output stem (default benchmarks/results/backdoorbench-…)")
    args = p.parse_args(argv)
    name = args.grid.stem
    outs = args.tabulate or [args.out or Path("/tmp") / f"bb-{name}"]
    out = outs[0]
    if args.tabulate is None:
        cmd = ["netmend", "bench", str(args.grid), "--out", str(out), "--workers", str(args.workers)]
        if args.ray:
            cmd += ["--ray", args.ray]
        print("running:", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc not in (0, 1):             # 1: some cells failed; they are listed in the table
            sys.exit(rc)
    runs = [list({r["cell"]: r for r in read_rows(o)}.values()) for o in outs]
    rows = in_grid_order(merged(kept_rows(args.keep) if args.keep else [], runs), args.grid)
    lines, csv_rows = tables(rows)
    stem = args.results or HERE / "results" / name
    head = [f"# {name}: every attack × every defence (BackdoorBench's table)", "",
            f"- command: `python benchmarks/backdoorbench.py {' '.join(sys.argv[1:])}` (grid {args.grid.name}; "
            f"cells in {', '.join(map(str, outs))}" + (f", the others from {args.keep.name}" if args.keep else "") + ")",
            f"- machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
            f"python {platform.python_version()}; one torch thread per worker",
            "- shares in %, mean ± std over seeds; DER as BackdoorBench defines it; a row's numbers are what the "
            "defence returned, and `gate accepted` says how often netmend's acceptance gate would keep it", ""]
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(head + lines) + "\n")
    if csv_rows:
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
            w.writeheader()
            w.writerows(csv_rows)
    print("\n".join(head + lines))
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
