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

Models are trained once and cached under --cache. Writes <out>.csv and <out>.md.
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

from netmend import api
from netmend.data.triggers import TriggerSpec
from netmend.data.wanet import wanet_spec
from netmend.defects.adversarial import AdversarialOptions, adversarial_from_info
from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info
from netmend.defects.wrong_predictions import WrongPredictionsOptions, train_mislabelled, wrong_predictions_from_info
from netmend.errors import NetmendError
from netmend.modelio import load_model_folder, save_model_folder
from netmend.registry import METHODS
from netmend.train import TrainConfig, default_epochs, train_backdoored

TRIGGERS = {"badnets": TriggerSpec(kind="badnets", size=3), "blended": TriggerSpec(kind="blended", alpha=0.2),
            "wanet": wanet_spec(), "clean": None}
# Mislabelled models: (class, labelled as) — the pair annotators confuse most (Fashion-MNIST: shirt as T-shirt).
MISLABEL = {"fashion-mnist": (6, 0), "cifar10": (3, 5)}
MISLABEL_FRACTION = 0.4
CODE = {"clean_weight": 0.0, "momentum": 0.0, "augment": True, "asr_threshold": None, "epochs": 20}  # INNER's code


def cached_model(cache: Path, trigger: str, seed: int, device: str, data_dir, dataset: str = "fashion-mnist",
                 arch: str = "small-cnn", epochs: int | None = None):
    folder = cache / f"{dataset}-{arch}-{trigger}-s{seed}"
    if not (folder / "model.json").is_file():
        cfg = TrainConfig(epochs=epochs or default_epochs(arch, dataset), seed=seed)
        if trigger == "mislabelled":
            source, as_class = MISLABEL.get(dataset, (1, 0))
            model, info = train_mislabelled(dataset, arch, source, as_class, MISLABEL_FRACTION, cfg, device, data_dir)
        else:
            model, info = train_backdoored(dataset, arch, TRIGGERS[trigger], target=0, poison_rate=0.1,
                                           cfg=cfg, device=device, data_dir=data_dir)
        print(f"trained {folder.name}: {info['metrics']}", flush=True)
        save_model_folder(folder, model, info)
    return load_model_folder(folder)


def rows_for(case: str, model, defect, runs: list[tuple[str, dict]], device: str, seed: int, done) -> None:
    """One row per (label, api.repair options), handed to `done(row)` as soon as it is measured, so a cut-off run
    keeps what it measured."""
    before = defect.metrics(model)
    for label, kw in runs:
        t0 = time.perf_counter()
        try:
            r = api.repair(model, defect, before=before, device=device, seed=seed, **kw)
        except NetmendError as e:             # a combination that does not apply: say so in the table
            row = {"case": case, "method": label, "error": str(e)}
        else:
            det = r.sites.details if r.sites is not None else {}
            row = {"case": case, "method": label, "seconds": round(time.perf_counter() - t0, 2),
                   "locate_s": round(r.locate_seconds, 2), "repair_s": round(r.repair_seconds, 2),
                   "probe_s": round(det.get("probe_seconds", float("nan")), 2),
                   "routing_s": round(det.get("routing_seconds", float("nan")), 2),
                   "changed_weights": r.edit.num_changed(),
                   "layers": " ".join(r.sites.layers()) if r.sites else "all"}
            for k in ("clean_accuracy", "asr", "robust_accuracy", "class_fairness_gap", "evidence_fixed",
                      "heldout_fixed"):
                if k in r.after:
                    row[f"{k}_before"], row[f"{k}_after"] = round(before[k], 4), round(r.after[k], 4)
        print(row, flush=True)
        done(row)


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["badnets", "blended", "wanet", "adversarial", "pgd",
                                                     "wrong-predictions", "mislabelled", "mislabelled-class"])
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/models/inner"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | cifar10 (the JPEG copy) | mnist ...")
    ap.add_argument("--arch", default="small-cnn", help="small-cnn | preact-resnet18 | vgg11 (the last two: GPU)")
    ap.add_argument("--epochs", type=int, help="training epochs of a model not yet cached (default: by arch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-others", dest="others", action="store_false", help="skip rectify / care rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inner")
    ap.add_argument("--methods", nargs="+", help="run only the rows with these labels (e.g. 'inner' 'finetune')")
    ap.add_argument("--merge", action="store_true", help="keep the rows not rerun from the existing <out>.csv")
    a = ap.parse_args(argv)
    torch.set_num_threads(1 if a.device == "cpu" else torch.get_num_threads())
    rows: list[dict] = []

    def record(row: dict) -> None:           # after every row: a cut-off run keeps what it measured
        rows.append(row)
        write(a.out, merged(a.out, rows) if a.merge else rows, a)

    def model_for(trigger: str):
        return cached_model(a.cache, trigger, a.seed, a.device, a.data_dir, a.dataset, a.arch, a.epochs)

    inner_code = ("inner (code loss)", {"method": "inner", "repair_options": CODE})
    for case in a.cases:
        if case in ("badnets", "blended", "wanet"):
            model, info = model_for(case)
            defect = backdoor_from_info(info, BackdoorOptions(pairs=1, seed=a.seed), data_dir=a.data_dir)
            runs = [("inner", {"method": "inner"}), inner_code,
                    ("inner + INNER's augmentation", {"method": "inner", "repair_options": {"augment": True}}),
                    ("finetune", {"method": "finetune"}),
                    ("probe -> finetune (exchange)", {"localiser": "probe", "repairer": "finetune"})]
            others = ("rectify", "care") if a.others else ()
            runs += [(m, {"method": m}) for m in others if m in METHODS]
            if "care" in others and "care" in METHODS:
                causal = METHODS.get("care").localiser
                runs += [("causal -> masked_tune (exchange)", {"localiser": causal, "repairer": "masked_tune"}),
                         ("causal -> finetune (exchange)", {"localiser": causal, "repairer": "finetune"})]
        elif case in ("adversarial", "pgd"):
            model, info = model_for("clean")
            attack = "pgd" if case == "pgd" else "fgsm"
            defect = adversarial_from_info(info, AdversarialOptions(pairs=1000, eps=0.1, seed=a.seed, attack=attack),
                                           data_dir=a.data_dir, model=model)
            runs = [("inner", {"method": "inner"}), inner_code,
                    ("inner, evidence not refreshed", {"method": "inner", "repair_options": {"refresh": False}}),
                    ("finetune", {"method": "finetune"}),
                    ("finetune, evidence refreshed", {"method": "finetune", "repair_options": {"refresh": True}}),
                    ("probe -> finetune, evidence refreshed (exchange)",
                     {"localiser": "probe", "repairer": "finetune", "repair_options": {"refresh": True}})]
        elif case in ("wrong-predictions", "mislabelled", "mislabelled-class"):
            model, info = model_for("clean" if case == "wrong-predictions" else "mislabelled")
            classes = str(info["defect"]["mislabelled"]["class"]) if case == "mislabelled-class" else None
            defect = wrong_predictions_from_info(info, WrongPredictionsOptions(seed=a.seed, classes=classes),
                                                 data_dir=a.data_dir, model=model)
            runs = [("inner", {"method": "inner"}), inner_code, ("finetune", {"method": "finetune"})]
        else:
            sys.exit(f"unknown case {case!r}")
        if a.methods:
            runs = [r for r in runs if r[0] in a.methods]
        rows_for(case, model, defect, runs, a.device, a.seed, record)


def merged(out: Path, rows: list[dict]) -> list[dict]:
    """The rows of the existing <out>.csv with the (case, method) rows just measured put in their place
    (new ones after their case's last row)."""
    path = out.with_suffix(".csv")
    if not path.is_file():
        return rows
    with open(path, newline="") as f:
        old = [{k: _number(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    fresh = {(r["case"], r["method"]): r for r in rows}
    result = [fresh.pop((r["case"], r["method"]), r) for r in old]
    for r in fresh.values():
        last = max((i for i, o in enumerate(result) if o["case"] == r["case"]), default=len(result) - 1)
        result.insert(last + 1, r)
    return result


def _number(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


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
             + (" (rows not rerun kept from the earlier file)" if a.merge else ""), "",
             "| case | method | C-Acc | ASR | R-Acc | fairness gap | evidence fixed | held-out fixed | s | locate s (probe / routing) | repair s | changed weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(r, k):
        return f"{100 * r[k + '_before']:.1f} → {100 * r[k + '_after']:.1f}" if k + "_before" in r else "–"

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['method']} | not run: {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['case']} | {r['method']} | {pair(r, 'clean_accuracy')} | {pair(r, 'asr')} | "
                     f"{pair(r, 'robust_accuracy')} | {pair(r, 'class_fairness_gap')} | {pair(r, 'evidence_fixed')} | "
                     f"{pair(r, 'heldout_fixed')} | {r['seconds']} | {r['locate_s']} ({r['probe_s']} / {r['routing_s']}) | "
                     f"{r['repair_s']} | {r['changed_weights']} |")
    notes = notes_after_table(out.with_suffix(".md")) if a.merge else []
    out.with_suffix(".md").write_text("\n".join(lines + notes) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


def notes_after_table(md: Path) -> list[str]:
    """The prose after an existing table (notes written by hand about the rows): a merge keeps it."""
    if not md.is_file():
        return []
    lines = md.read_text().splitlines()
    rows = [i for i, l in enumerate(lines) if l.startswith("|")]
    rest = lines[rows[-1] + 1:] if rows else []
    return rest if any(l.strip() for l in rest) else []


if __name__ == "__main__":
    main()
