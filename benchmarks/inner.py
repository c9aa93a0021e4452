"""Benchmark: INNER (probe + masked_tune) against fine-tuning (and rectify / care when present) on
Fashion-MNIST small-cnn: BadNets, Blended and WaNet backdoors (10% poisoning, target 0), targeted
FGSM (`adversarial`) and PGD (`pgd`, 10 steps) adversarial examples and wrong predictions (on a clean
model; `mislabelled`: on a model trained with 40 % of one class labelled as another, evidence from every
class; `mislabelled-class`: evidence from the mislabelled class only), plus the exchange rows (INNER's
fault weights driving `finetune`, CARE's neurons driving `masked_tune`).

    python benchmarks/inner.py                       # everything, CPU
    python benchmarks/inner.py --cases badnets --device cuda
    python benchmarks/inner.py --dataset cifar10 --cases badnets --out benchmarks/results/inner-cifar10
    python benchmarks/inner.py --cases wanet --methods inner finetune --merge   # rerun two rows, keep the rest
    python benchmarks/inner.py --cases adversarial --models /work/cache/models/inner   # models an earlier run trained

A thin wrapper over `netmend bench`: each case is one grid, <bench>/<case>.toml, with the case's model and its rows as
the grid's methods. The model is a BadNets / Blended / WaNet attack, a clean model (`defect = "clean"`: the cells of
`adversarial`, `pgd` and `wrong-predictions` name their defect, `kind = "adversarial"` with `attack = "fgsm"` or
`"pgd"`, or `kind = "wrong-predictions"`) or a mislabelled one (`defect = "mislabelled"`). The grids run on --workers
local workers (one torch thread each) into <bench>/<case>-<grid hash>/, and a rerun of the same command resumes them.
<bench> defaults to benchmarks/runs/<out name>-bench (not in git).

Models: trained by the grids, once, and cached by the hash of their training recipe under --cache (default
<bench>/models). The three clean-model cases share one model, and so do the two mislabelled ones. With --models DIR,
the grids repair the model folders DIR holds instead, named as this script cached them before it ran on `netmend
bench`: <dataset>-<arch>-<badnets|blended|wanet|clean|mislabelled>-s<seed>.

Each row is read from its cell's run folder (metrics.json, sites.json) through netmend.bench.read_cells; a row's `s`
is its whole cell (model load, defect, measurements before and after, repair, run folder). Writes <out>.csv and
<out>.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from netmend.bench.table import read_csv
from netmend.bench.toml_text import toml_value
from netmend.edit import Edit

BACKDOORS = {                        # the attack tables of the backdoor cases (target 0, 10 % poisoning: the defaults)
    "badnets": {"size": 3, "pattern_seed": 0},
    "blended": {"alpha": 0.2, "pattern_seed": 0},
    "wanet": {"pattern_seed": 0, "params": {"k": 4, "s": 0.5}},
}
# Mislabelled models: (class, labelled as) — the pair annotators confuse most (Fashion-MNIST: shirt as T-shirt).
MISLABEL = {"fashion-mnist": (6, 0), "cifar10": (3, 5)}
MISLABEL_FRACTION = 0.4
CASES = ["badnets", "blended", "wanet", "adversarial", "pgd", "wrong-predictions", "mislabelled", "mislabelled-class"]
MODEL = {"adversarial": "clean", "pgd": "clean", "wrong-predictions": "clean", "mislabelled": "mislabelled",
         "mislabelled-class": "mislabelled"}                 # the model a case repairs (backdoors: their own)
# INNER's code: the inner preset's repairer options replaced; its asr_threshold = null (TOML has no null) is
# masked_tune's own default, so the row is probe + masked_tune without the preset
CODE = {"clean_weight": 0.0, "momentum": 0.0, "augment": True, "epochs": 20}
INNER_CODE = ("inner (code loss)", {"localiser": "probe", "repairer": "masked_tune", "repair": CODE})
METRICS = ("clean_accuracy", "asr", "robust_accuracy", "class_fairness_gap", "evidence_fixed", "heldout_fixed")


def rows_of_case(case: str, others: bool) -> list[tuple[str, dict[str, Any]]]:
    """The case's rows: (label, its grid method table)."""
    from netmend.registry import METHODS

    inner = ("inner", {"method": "inner"})
    finetune = ("finetune", {"method": "finetune"})
    if case in BACKDOORS:
        runs = [inner, INNER_CODE, ("inner + INNER's augmentation", {"method": "inner", "repair": {"augment": True}}),
                finetune, ("probe -> finetune (exchange)", {"localiser": "probe", "repairer": "finetune"})]
        wanted = ("rectify", "care") if others else ()
        runs += [(m, {"method": m}) for m in wanted if m in METHODS]
        if "care" in wanted and "care" in METHODS:
            causal = METHODS.get("care").localiser
            runs += [("causal -> masked_tune (exchange)", {"localiser": causal, "repairer": "masked_tune"}),
                     ("causal -> finetune (exchange)", {"localiser": causal, "repairer": "finetune"})]
        return runs
    if case in ("adversarial", "pgd"):
        return [inner, INNER_CODE, ("inner, evidence not refreshed", {"method": "inner", "repair": {"refresh": False}}),
                finetune, ("finetune, evidence refreshed", {"method": "finetune", "repair": {"refresh": True}}),
                ("probe -> finetune, evidence refreshed (exchange)",
                 {"localiser": "probe", "repairer": "finetune", "repair": {"refresh": True}})]
    return [inner, INNER_CODE, finetune]


def old_folder(args, case: str) -> Path:
    """The model folder an earlier inner.py cached for the case (--models)."""
    folder = args.models / f"{args.dataset}-{args.arch}-{MODEL.get(case, case)}-s{args.seed}"
    if not (folder / "model.json").is_file():
        raise SystemExit(f"--models: no model folder {folder}")
    return folder


def grid_text(case: str, args) -> str:
    """The case as one `netmend bench` grid: its model (trained, or --models' folder) × its rows × the seed."""
    lines = [f'title = "INNER benchmark: {case} ({args.dataset} {args.arch}, seed {args.seed})"',
             f"device = {toml_value(args.device)}"]
    if args.data_dir:
        lines.append(f"data_dir = {toml_value(str(Path(args.data_dir).resolve()))}")
    defect: dict[str, Any] = {}
    if case in BACKDOORS:
        defect = {"pairs": 1}
    elif case in ("adversarial", "pgd"):
        defect = {"kind": "adversarial", "pairs": 1000, "eps": 0.1, "attack": "pgd" if case == "pgd" else "fgsm"}
    elif case == "wrong-predictions":
        defect = {"kind": "wrong-predictions"}
    if args.models:
        folder = old_folder(args, case)
        if case == "mislabelled-class":
            info = json.loads((folder / "model.json").read_text())
            defect["classes"] = str(info["defect"]["mislabelled"]["class"])
        lines.append(f"models = [{{ folder = {toml_value(str(folder.resolve()))}, seeds = [{args.seed}] }}]")
    else:
        name = MODEL.get(case, case)
        if case in BACKDOORS:
            attack = BACKDOORS[case]
        elif name == "clean":
            attack = {"defect": "clean"}
        else:
            source, as_class = MISLABEL.get(args.dataset, (1, 0))
            attack = {"defect": "mislabelled", "source_class": source, "as_class": as_class,
                      "fraction": MISLABEL_FRACTION}
            if case == "mislabelled-class":
                defect["classes"] = str(source)
        lines += [f"seeds = [{args.seed}]", f"datasets = [{toml_value(args.dataset)}]", f"archs = [{toml_value(args.arch)}]",
                  "", f"[attacks.{name}]", *(f"{k} = {toml_value(v)}" for k, v in attack.items())]
        if args.epochs:
            lines += ["", "[train]", f"epochs = {args.epochs}"]
    if defect:
        lines += ["", "[defect]", *(f"{k} = {toml_value(v)}" for k, v in defect.items())]
    for label, method in rows_of_case(case, args.others):
        lines += ["", f"[methods.{json.dumps(label)}]", *(f"{k} = {toml_value(v)}" for k, v in method.items())]
    return "\n".join(lines) + "\n"


def row_of(case: str, res) -> dict[str, Any]:
    """One table row from a cell (a `netmend.bench.CellResult`): its run folder's metrics and sites."""
    if res.status != "ok":                    # a combination that does not apply: say so in the table
        return {"case": case, "method": res.coords["method"], "error": res.error or "not run"}
    met = json.loads((res.run / "metrics.json").read_text())
    sites = json.loads((res.run / "sites.json").read_text())
    det = sites.get("details") or {}
    layers = list(dict.fromkeys(s["layer"] for s in sites["sites"]))
    row = {"case": case, "method": res.coords["method"], "seconds": round(res.seconds, 2),
           "locate_s": round(met["locate_seconds"], 2), "repair_s": round(met["repair_seconds"], 2),
           "probe_s": round(det.get("probe_seconds", float("nan")), 2),
           "routing_s": round(det.get("routing_seconds", float("nan")), 2),
           "changed_weights": res.row["changed_weights"], "layers": " ".join(layers) if layers else "all",
           "gate": "accepted" if met["accepted"] else f"rejected: {(met.get('gate') or {}).get('reason', '')}"}
    # a rejected repair hands back the input model; the row shows what the method made (its candidate), as the
    # literature reports every method, and the gate column says netmend would not keep it
    after = met["after"]
    if not met["accepted"] and met.get("candidate_after"):
        after = met["candidate_after"]
        candidate = res.run / "candidate-edit.safetensors"
        if candidate.is_file():
            row["changed_weights"] = Edit.load(candidate).num_changed()
    for k in METRICS:
        if k in after:
            row[f"{k}_before"], row[f"{k}_after"] = round(met["before"][k], 4), round(after[k], 4)
    return row


def run_case(case: str, args) -> list[dict[str, Any]]:
    """Write and run the case's grid (only the rows --methods names; resumed when its folder holds this grid's
    output), then read its rows from the cells."""
    from netmend.bench import load_grid, read_cells, run_bench

    labels = [label for label, _ in rows_of_case(case, args.others)]
    if args.methods:
        labels = [label for label in labels if label in args.methods]
    if not labels:
        return []
    args.bench.mkdir(parents=True, exist_ok=True)
    grid = args.bench / f"{case}.toml"
    grid.write_text(grid_text(case, args))
    plan = load_grid(grid)
    out = args.bench / f"{case}-{plan.hash[:10]}"          # other options: another folder
    run_bench(grid, out, workers=args.workers, cache=args.cache, only=labels, log=lambda *a: print(*a, flush=True))
    rows = []
    for res in read_cells(out, plan):
        if res.coords["method"] in labels:
            rows.append(row_of(case, res))
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--cache", type=Path, default=None, help="the grids' model cache: models by the hash of their "
                                                             "training recipe (default <bench>/models)")
    ap.add_argument("--models", type=Path, default=None, help="repair the model folders here (<dataset>-<arch>-"
                                                              "<model>-s<seed>, as inner.py cached them) instead")
    ap.add_argument("--bench", type=Path, default=None, help="the grids and their outputs (default "
                                                             "benchmarks/runs/<out name>-bench; a rerun resumes them)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | cifar10 (the JPEG copy) | mnist ...")
    ap.add_argument("--arch", default="small-cnn", help="small-cnn | preact-resnet18 | vgg11 (the last two: GPU)")
    ap.add_argument("--epochs", type=int, help="training epochs of a model not yet cached (default: by arch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="netmend bench workers (one torch thread each)")
    ap.add_argument("--no-others", dest="others", action="store_false", help="skip rectify / care rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inner")
    ap.add_argument("--methods", nargs="+", help="run only the rows with these labels (e.g. 'inner' 'finetune')")
    ap.add_argument("--merge", action="store_true", help="keep the rows not rerun from the existing <out>.csv")
    a = ap.parse_args(argv)
    a.bench = a.bench or Path(__file__).parent / "runs" / f"{a.out.name}-bench"      # runs/: not in git
    a.cache = a.cache or a.bench / "models"            # one model cache for every case's grid
    rows: list[dict] = []
    for case in a.cases:
        rows += run_case(case, a)
        write(a.out, merged(a.out, rows) if a.merge else rows, a)     # after every case: a cut-off run keeps them


def merged(out: Path, rows: list[dict]) -> list[dict]:
    """The rows of the existing <out>.csv with the (case, method) rows just measured put in their place
    (new ones after their case's last row)."""
    path = out.with_suffix(".csv")
    if not path.is_file():
        return rows
    old = [{k: v for k, v in r.items() if v != ""} for r in read_csv(path)]
    fresh = {(r["case"], r["method"]): r for r in rows}
    result = [fresh.pop((r["case"], r["method"]), r) for r in old]
    for r in fresh.values():
        last = max((i for i, o in enumerate(result) if o["case"] == r["case"]), default=len(result) - 1)
        result.insert(last + 1, r)
    return result


def write(out: Path, rows: list[dict], a) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, 1 thread"
    lines = [f"# INNER benchmark ({a.dataset} {a.arch}, seed {a.seed}, device: {dev})", "",
             "Backdoors: 10% poisoning, target 0, repair data 5% of the training set (clean held-out samples, "
             "20% of them validation), 1 pair. Metrics on the 10k test set; rates in %.", "",
             f"Last command: `{' '.join(['python benchmarks/inner.py'] + sys.argv[1:])}`"
             + (" (rows not rerun kept from the earlier file)" if a.merge else "")
             + f"; `netmend bench` with {a.workers} worker(s) of one torch thread each, s: the whole cell.", "",
             "A row shows what the method made; `gate` says whether netmend's acceptance gate keeps it (a rejected "
             "repair is handed back as the input model).", "",
             "| case | method | C-Acc | ASR | R-Acc | fairness gap | evidence fixed | held-out fixed | s | locate s (probe / routing) | repair s | changed weights | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(r, k):
        return f"{100 * r[k + '_before']:.1f} → {100 * r[k + '_after']:.1f}" if k + "_before" in r else "–"

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['method']} | not run: {r['error']} |" + " |" * 10)
            continue
        lines.append(f"| {r['case']} | {r['method']} | {pair(r, 'clean_accuracy')} | {pair(r, 'asr')} | "
                     f"{pair(r, 'robust_accuracy')} | {pair(r, 'class_fairness_gap')} | {pair(r, 'evidence_fixed')} | "
                     f"{pair(r, 'heldout_fixed')} | {r['seconds']} | {r['locate_s']} ({r['probe_s']} / {r['routing_s']}) | "
                     f"{r['repair_s']} | {r['changed_weights']} | {r.get('gate', '–')} |")
    notes = notes_after_table(out.with_suffix(".md")) if a.merge else []
    out.with_suffix(".md").write_text("\n".join(lines + notes) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


def notes_after_table(md: Path) -> list[str]:
    """Everything after the results table of an existing file (notes and further tables written by hand about the
    rows): a merge keeps it. The results table is the file's first run of table lines."""
    if not md.is_file():
        return []
    lines = md.read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("|")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rest = lines[end:]
    return rest if any(l.strip() for l in rest) else []


if __name__ == "__main__":
    main()
