"""Benchmark: does a repair from one pair at one position reach the trigger at other positions and visibilities?

    python benchmarks/rectify_generalisation.py                      # the Fashion-MNIST grid, seeds 0 1 2
    python benchmarks/rectify_generalisation.py --tabulate OUT       # only measure a finished grid output

The rectification paper's generalisation tables, as a thin wrapper over `netmend bench`. The grid
(benchmarks/grids/rectify-generalisation-fashion-mnist.toml) plants a backdoor that fires wherever and however
faintly the patch appears: the poisoned training images carry the 3×3 BadNets patch at one of four positions
(bottom-right, top-left, centre, bottom-left) and one of four visibilities (0.3, 0.5, 0.7, 1.0), in turn. The
repair sees its evidence pairs at bottom-right, full visibility, only. This script then loads each cell's model
before and after (a rejected candidate's own edit, so the table shows what the method made) and measures ASR on
the test set with the patch at each position (full visibility) and at each visibility (bottom-right).
Writes <results>.csv (one row per cell × trigger variant) and <results>.md (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from netmend.api import defect_for
from netmend.bench import load_grid, read_cells
from netmend.data.triggers import stamp_batched
from netmend.edit import Edit
from netmend.metrics import attack_success_rate, predict
from netmend.modelio import load_model_folder

HERE = Path(__file__).parent
POSITIONS = ("br", "tl", "center", "bl")
VISIBILITIES = (0.3, 0.5, 0.7, 1.0)


def variant_asr(model, defect) -> dict[str, float]:
    """ASR on the test set with the patch at each position (full visibility) and each visibility (bottom-right)."""
    x, y, t = defect.x_test, defect.y_test, defect.target
    trig = defect.trigger
    out = {}
    for pos in POSITIONS:
        out[f"position {pos}"] = attack_success_rate(predict(model, stamp_batched(trig.at(pos, 1.0), x)), y, t)
    for vis in VISIBILITIES:
        out[f"visibility {vis}"] = attack_success_rate(predict(model, stamp_batched(trig.at("br", vis), x)), y, t)
    return out


def measure(grid: Path, out: Path, cache: Path) -> list[dict]:
    """Per finished cell: ASR at every trigger variant before and after, and the cell's accuracy and gate verdict."""
    plan = load_grid(grid)
    rows = []
    for c, res in zip(plan.cells, read_cells(out, plan)):
        if res.status != "ok":
            continue
        model, info = load_model_folder(cache / c.model_key)
        defect = defect_for(info, **{**c.defect, "seed": c.seed})
        candidate = res.run / "candidate-edit.safetensors"
        fixed = (Edit.load(candidate).apply(copy.deepcopy(model)) if candidate.is_file()
                 else load_model_folder(res.run)[0])
        before, after = variant_asr(model, defect), variant_asr(fixed, defect)
        r = res.row
        own = res.made
        for variant in before:
            rows.append({"dataset": c.coords["dataset"], "seed": c.seed, "method": c.coords["method"],
                         "variant": variant, "accepted": r["accepted"],
                         "clean_accuracy_before": r["before_clean_accuracy"],
                         "clean_accuracy_after": r[f"{own}_clean_accuracy"], "asr_before": before[variant],
                         "asr_after": after[variant], "repair_seconds": res.repair_seconds})
    return rows


def _ms(v: list[float]) -> str:
    v = [100 * x for x in v]
    return f"{v[0]:.2f}" if len(v) == 1 else f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def write(rows: list[dict], out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# rectify: one pair at one position, the trigger elsewhere ({rows[0]['dataset']}, small-cnn)", "",
             f"- command: `{command}`",
             f"- machine: {platform.machine()} {platform.system()}, {torch.__version__}, python "
             f"{platform.python_version()}; seeds {seeds} (mean ± std over seeds)",
             "- model: BadNets 3×3 white patch, target 0, 10 % poisoning; the poisoned training images carry the "
             f"patch at positions {', '.join(POSITIONS)} and visibilities {', '.join(map(str, VISIBILITIES))} in turn",
             "- repair: evidence pairs at bottom-right, full visibility only; ASR (%) on the 10 000 test images with the "
             "patch at each position (full visibility) and each visibility (bottom-right)", ""]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines += ["| method | C-Acc before → after | accepted | " + " | ".join(variants) + " |",
              "|---|---|---|" + "---|" * len(variants)]
    before = {v: [r["asr_before"] for r in rows if r["variant"] == v and r["method"] == rows[0]["method"]]
              for v in variants}
    lines.append("| no defence | – | – | " + " | ".join(_ms(before[v]) for v in variants) + " |")
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        first = [r for r in mine if r["variant"] == variants[0]]
        acc = f"{_ms([r['clean_accuracy_before'] for r in first])} → {_ms([r['clean_accuracy_after'] for r in first])}"
        ok = f"{sum(bool(r['accepted']) for r in first)}/{len(first)}"
        lines.append(f"| {m} | {acc} | {ok} | " + " | ".join(
            _ms([r["asr_after"] for r in mine if r["variant"] == v]) for v in variants) + " |")
    lines += ["", "A rejected repair (the acceptance gate) is shown with its candidate's numbers; netmend would hand "
              "back the input model."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=Path, default=HERE / "grids" / "rectify-generalisation-fashion-mnist.toml")
    ap.add_argument("--out", type=Path, default=None, help="the grid's output folder (default /tmp/gen-<grid name>)")
    ap.add_argument("--cache", type=Path, default=None, help="trained-model cache (default OUT/models)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tabulate", action="store_true", help="only measure the finished cells of --out")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "rectify-generalisation")
    args = ap.parse_args()
    out = args.out or Path("/tmp") / f"gen-{args.grid.stem}"
    cache = args.cache or out / "models"
    if not args.tabulate:
        cmd = ["netmend", "bench", str(args.grid), "--out", str(out), "--cache", str(cache),
               "--workers", str(args.workers)]
        print("running:", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc not in (0, 1):             # 1: some cells failed; the others are measured
            sys.exit(rc)
    torch.set_num_threads(1)
    rows = measure(args.grid, out, cache)
    if not rows:
        sys.exit(f"no finished cells in {out}")
    write(rows, args.results, f"python benchmarks/rectify_generalisation.py {' '.join(sys.argv[1:])}".strip())


if __name__ == "__main__":
    main()
