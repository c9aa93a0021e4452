"""Benchmark: attribution-guided rectification (dynamic / static) against fine-tuning baselines.

    python benchmarks/rectify.py                                     # Fashion-MNIST: 6 models, 60 cells, 2 workers
    python benchmarks/rectify.py --datasets fashion-mnist mnist-5k cifar10
    python benchmarks/rectify.py --datasets cifar10 --only "rectify n=1,finetune 5%"
    python benchmarks/rectify.py --datasets fashion-mnist --tabulate OUT   # only tabulate a grid output

A thin wrapper over `netmend bench`: per dataset, the grid file benchmarks/grids/rectify-<dataset>.toml says which
models (small CNN, BadNets 3×3 and Blended α 0.2, 10 % poisoning, target 0, seeds 0–2) and which methods. The
script runs the grid, or resumes it, then writes the table the README shows: clean accuracy, ASR, R-Acc (triggered
non-target test images still given their true class) and the no-trigger ASR (`asr_clean`: ordinary confusion into
the target, the floor an ASR should not go below) before and after, repair seconds, samples, the gate's verdict and
the edited layers (γ, the overshoot of each round). A row shows what the method returned: a candidate the
acceptance gate rejected is shown with its own numbers (netmend hands back the input model instead).
Writes <results>.csv (one row per cell) and <results>.md (mean ± std over seeds), default
benchmarks/results/rectify-<dataset>.
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
from netmend.edit import Edit

HERE = Path(__file__).parent
DATASETS = ("fashion-mnist", "mnist-5k", "cifar10")
METRICS = ("clean_accuracy", "asr", "robust_accuracy", "asr_clean")


def grid_of(dataset: str) -> Path:
    return HERE / "grids" / f"rectify-{dataset}.toml"


def edit_rounds(run: Path) -> tuple[str, str]:
    """The layers the method edited and each round's overshoot γ, from the edit it made (a rejected one included)."""
    path = next((p for p in (run / "candidate-edit.safetensors", run / "edit.safetensors") if p.is_file()), None)
    meta = Edit.load(path).meta if path is not None else {}
    gammas = " ".join(str(r.get("overshoot", 1.0)) for r in (meta.get("rounds") or [])[1:] if "layer" in r)
    return " ".join(meta.get("layers", []) or []), gammas


def read_rows(grid: Path, out: Path) -> tuple[list[dict], list[str]]:
    """One row per finished cell, in the grid's order, with the method's own numbers; and the failed cells' lines."""
    plan = load_grid(grid)
    rows, failed = [], []
    for res in read_cells(out, plan):
        if res.status == "failed":
            failed.append(f"- {res.id}: {res.error}")
        if res.status != "ok":
            continue
        r, c = res.row, res.coords
        own = res.made
        layers, gammas = edit_rounds(res.run)
        rows.append({"dataset": c["dataset"], "trigger": c["attack"], "method": c["method"], "seed": res.seed,
                     "accepted": str(r["accepted"]) == "True",
                     **{f"{m}_before": float(r[f"before_{m}"]) for m in METRICS},
                     **{m: float(r[f"{own}_{m}"]) for m in METRICS},
                     "repair_seconds": res.repair_seconds, "samples_used": r["samples_used"],
                     "overshoot": gammas, "layers": layers})
    return rows, failed


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    return f"{v[0]:.{digits}f}" if len(v) == 1 else f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def floor_lines(rows: list[dict]) -> list[str]:
    """The ASR a model without the backdoor would show: clean non-target test images the backdoored model already
    classifies as the target (ordinary confusion). An ASR below it is over-correction, not a better repair."""
    per: dict[tuple, dict[int, float]] = {}
    for r in rows:
        per.setdefault((r["dataset"], r["trigger"]), {})[r["seed"]] = r["asr_clean_before"]
    return [f"- {ds} / {trig}: clean non-target test images the backdoored model calls the target (the ASR floor of "
            f"ordinary confusion): {_ms(list(v.values()))} % over seeds {sorted(v)}" for (ds, trig), v in per.items()]


def table(rows: list[dict]) -> list[str]:
    lines = ["| dataset | trigger | method | seeds | gate accepted | C-Acc before % | C-Acc after % | ASR before % | "
             "ASR after % | R-Acc after % | no-trigger ASR after % | repair s | samples | layers (γ), first seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["trigger"], r["method"]), []).append(r)
    for (ds, trig, meth), g in groups.items():
        first = g[0]
        gammas = f" ({first['overshoot']})" if first["overshoot"] else ""
        lines.append(f"| {ds} | {trig} | {meth} | {len(g)} | {sum(r['accepted'] for r in g)}/{len(g)} | "
                     f"{_ms([r['clean_accuracy_before'] for r in g])} | {_ms([r['clean_accuracy'] for r in g])} | "
                     f"{_ms([r['asr_before'] for r in g])} | {_ms([r['asr'] for r in g])} | "
                     f"{_ms([r['robust_accuracy'] for r in g])} | {_ms([r['asr_clean'] for r in g])} | "
                     f"{_ms([r['repair_seconds'] for r in g], 1, 1)} | {first['samples_used']} | "
                     f"{first['layers'] or '–'}{gammas} |")
    return lines


def write(rows: list[dict], failed: list[str], stem: Path, grid: Path, out: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# rectify benchmark: {rows[0]['dataset']} (small-cnn, 10 % poisoning, target 0)", "",
             f"- command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}` (grid {grid.name}; "
             f"cells in {out})",
             f"- machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
             f"python {platform.python_version()}; one torch thread per worker; seeds "
             f"{sorted({r['seed'] for r in rows})} (mean ± std over seeds)",
             "- a row's numbers are what the method returned; `gate accepted` says how often netmend's acceptance gate "
             "kept it (a rejected repair hands back the input model)",
             "- samples: every sample the repair looked at: its fit data, the pairs and the validation split the gate "
             "judges on", "", *table(rows), "", *floor_lines(rows)]
    if failed:
        lines += ["", "Failed cells:", "", *failed]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.csv')}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist"], choices=DATASETS)
    p.add_argument("--only", default=None, help="run only these methods' cells (the grid's labels, comma-separated)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray", default=None, help="run the grid on a Ray cluster (auto | ADDRESS | local)")
    p.add_argument("--out", type=Path, default=None,
                   help="the grid outputs' parent folder: one sub-folder per dataset (default /tmp/rectify-bench)")
    p.add_argument("--cache", type=Path, default=None, help="trained-model cache (default OUT/models)")
    p.add_argument("--tabulate", type=Path, default=None,
                   help="only tabulate this grid output (one dataset), finished or partial")
    p.add_argument("--results", type=Path, default=None, help="output stem (default benchmarks/results/rectify-<dataset>)")
    args = p.parse_args(argv)
    if args.tabulate and len(args.datasets) != 1:
        p.error("--tabulate reads one grid output: name its one dataset with --datasets")
    if args.results and len(args.datasets) != 1:
        p.error("--results names one table: name its one dataset with --datasets")
    base = args.out or Path("/tmp/rectify-bench")
    for ds in args.datasets:
        grid, out = grid_of(ds), args.tabulate or base / ds
        if args.tabulate is None:
            cmd = ["netmend", "bench", str(grid), "--out", str(out), "--cache", str(args.cache or base / "models"),
                   "--workers", str(args.workers)] + (["--ray", args.ray] if args.ray else []) \
                + (["--only", args.only] if args.only else [])
            print("running:", " ".join(cmd), flush=True)
            rc = subprocess.call(cmd)
            if rc not in (0, 1):             # 1: some cells failed; they are listed under the table
                sys.exit(rc)
        rows, failed = read_rows(grid, out)
        if not rows:
            sys.exit(f"no finished cells in {out}")
        write(rows, failed, args.results or HERE / "results" / f"rectify-{ds}", grid, out)


if __name__ == "__main__":
    main()
