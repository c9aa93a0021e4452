"""Benchmark: attribution-guided rectification (dynamic / static) against fine-tuning baselines.

    python benchmarks/rectify.py            # full table (fashion-mnist, mnist-5k, cifar10; 2 triggers; 3 seeds)
    python benchmarks/rectify.py --quick    # fashion-mnist, BadNets, seed 0: a few minutes once models are cached
    python benchmarks/rectify.py --device cuda --arch preact-resnet18 --datasets cifar10
    python benchmarks/rectify.py --floors   # no repair: each cached model's ASR without the trigger (the floor)

Trained models are cached under --cache (one folder per dataset/arch/trigger/seed), so each is trained once.
Writes <out>.csv (one row per run) and <out>.md (mean ± std per dataset/trigger/method, machine, seeds).
"""
from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from netmend.data.triggers import TriggerSpec
from netmend.modelio import load_model_folder, save_model_folder
from netmend.train import TrainConfig, default_epochs, train_backdoored

TRIGGERS = {
    "badnets": TriggerSpec(kind="badnets", size=3),
    "blended": TriggerSpec(kind="blended", alpha=0.2),
}


def cached_model(cache: Path, dataset: str, arch: str, trigger: str, seed: int, device: str = "cpu",
                 epochs: int | None = None):
    """Train (once) a backdoored model with 10% poisoning, target 0; return (model, info)."""
    folder = cache / f"{dataset}-{arch}-{trigger}-s{seed}"
    if not (folder / "model.json").is_file():
        cfg = TrainConfig(epochs=epochs or default_epochs(arch, dataset), seed=seed)
        t0 = time.perf_counter()
        model, info = train_backdoored(dataset, arch, TRIGGERS[trigger], target=0, poison_rate=0.1, cfg=cfg,
                                       device=device)
        print(f"trained {folder.name} in {time.perf_counter() - t0:.0f}s: {info['metrics']}", flush=True)
        save_model_folder(folder, model, info)
    return load_model_folder(folder)


# method label -> (preset, pairs, how the defect is built, repair options)
INVARIANT = {"probe_cost": "stamped"}  # price stamped inputs' error, not the pull rate: less over-correction
PAPER = {"transplant": 0}          # Algorithm 1 as published: judged on the pairs, exact edits (no probe, no overshoot)
METHODS = {
    "rectify n=1": ("rectify", 1, "default", {}),
    "rectify n=20": ("rectify", 20, "default", {}),
    "rectify (invariance cost) n=1": ("rectify", 1, "default", INVARIANT),
    "rectify (invariance cost) n=20": ("rectify", 20, "default", INVARIANT),
    "rectify (paper loop) n=1": ("rectify", 1, "default", PAPER),
    "rectify (paper loop) n=20": ("rectify", 20, "default", PAPER),
    "rectify-static n=1": ("rectify-static", 1, "default", {}),
    "rectify-static n=20": ("rectify-static", 20, "default", {}),
    # the same 20 cleansed twins and nothing else: the repair fit split is emptied (val kept for nothing)
    "finetune 20 cleansed": ("finetune", 20, "pairs-only", {}),
    "finetune 5%": ("finetune", 0, "default", {}),
}
QUICK = {"datasets": ["fashion-mnist"], "triggers": ["badnets", "blended"], "seeds": [0],
         "methods": ["rectify n=1", "rectify n=20", "rectify-static n=20", "finetune 5%"]}


def run_one(model, info, label: str, seed: int, device: str, eval_limit: int | None) -> dict:
    from netmend.api import defect_for, repair

    preset, pairs, how, options = METHODS[label]
    defect = defect_for(info, pairs=pairs, seed=seed, eval_limit=eval_limit)
    if how == "pairs-only":
        r = defect.repair
        defect.repair = type(r)(r.x_fit[:0], r.y_fit[:0], r.x_val, r.y_val, {"fit": [], "val": r.indices["val"]})
    res = repair(model, defect, method=preset, seed=seed, device=device, repair_options=dict(options))
    used = pairs if how == "pairs-only" else res.samples_used
    return {"clean_accuracy_before": res.before["clean_accuracy"], "asr_before": res.before["asr"],
            "clean_accuracy": res.after["clean_accuracy"], "asr": res.after["asr"],
            "robust_accuracy_before": res.before["robust_accuracy"], "robust_accuracy": res.after["robust_accuracy"],
            "asr_clean_before": res.before["asr_clean"], "asr_clean": res.after["asr_clean"],
            "repair_seconds": res.seconds, "samples_used": used,
            "overshoot": " ".join(str(r.get("overshoot", 1.0)) for r in (res.edit.meta.get("rounds") or [])[1:]
                                  if "layer" in r),
            "layers": " ".join(res.edit.meta.get("layers", []) or [])}


def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def _command() -> str:
    """The command line this run was started with, as the result files record it."""
    return f"`python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`"


def _recorded(g: list[dict], key: str) -> str:
    """mean ± std of a metric added after some rows were measured: those rows' groups show –."""
    v = [float(r[key]) for r in g if r.get(key) not in (None, "")]
    return _ms(v, 100) if len(v) == len(g) else "–"


def floor_lines(rows: list[dict]) -> list[str]:
    """The ASR a model without the backdoor would show: clean non-target test images the backdoored model
    already classifies as the target (ordinary confusion). An ASR below it is over-correction, not a better repair."""
    per: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("asr_clean_before") not in (None, ""):
            per.setdefault((r["dataset"], r["trigger"]), {})[r["seed"]] = float(r["asr_clean_before"])
    return [f"- {ds} / {trig}: clean non-target test images the backdoored model calls the target (the ASR floor "
            f"of ordinary confusion): {_ms(list(v.values()), 100)} % over seeds {sorted(v)}"
            for (ds, trig), v in per.items()]


def write_outputs(rows: list[dict], out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# rectify benchmark ({args.arch}, 10% poisoning, target 0)", "",
             f"machine: {platform.machine()} {platform.system()}, {torch.get_num_threads()} torch thread(s), "
             f"device {args.device}, torch {torch.__version__}; seeds {args.seeds}",
             f"command: {_command()}", "",
             "| dataset | trigger | method | C-Acc before % | C-Acc after % | ASR before % | ASR after % | R-Acc after % | no-trigger ASR after % | repair s | samples | layers (γ), first seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["trigger"], r["method"]), []).append(r)
    for (ds, trig, meth), g in groups.items():
        lines.append(f"| {ds} | {trig} | {meth} | {_ms([r['clean_accuracy_before'] for r in g], 100)} | "
                     f"{_ms([r['clean_accuracy'] for r in g], 100)} | {_ms([r['asr_before'] for r in g], 100)} | "
                     f"{_ms([r['asr'] for r in g], 100)} | {_recorded(g, 'robust_accuracy')} | {_recorded(g, 'asr_clean')} | {_ms([r['repair_seconds'] for r in g], 1, 1)} | "
                     f"{g[0]['samples_used']} | {g[0]['layers']}" + (f" ({g[0]['overshoot']})" if g[0]['overshoot'] else "") + " |")
    floors = floor_lines(rows)
    if floors:
        lines += ["", *floors]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def write_floors(args) -> None:
    from netmend.api import defect_for

    rows = []
    for ds in args.datasets:
        for trig in args.triggers:
            for seed in args.seeds:
                model, info = cached_model(args.cache, ds, args.arch, trig, seed, args.device, args.epochs)
                m = defect_for(info, pairs=1, seed=seed, eval_limit=args.eval_limit).metrics(model)
                rows.append({"dataset": ds, "trigger": trig, "seed": seed, "asr_clean_before": m["asr_clean"]})
                print(f"{ds} {trig} s{seed}: ASR {m['asr']:.4f}, without the trigger {m['asr_clean']:.4f}", flush=True)
    out = args.out.with_name(args.out.name + "-floors").with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([f"# ASR floors ({args.arch}, target 0)", "",
                              f"machine: {platform.machine()} {platform.system()}, torch {torch.__version__}; "
                              f"command: {_command()}", "",
                              *floor_lines(rows)]) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fashion-mnist, 2 triggers, seed 0, 4 methods")
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist-5k", "cifar10"])
    p.add_argument("--triggers", nargs="+", default=list(TRIGGERS), choices=list(TRIGGERS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arch", default="small-cnn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: netmend's per-arch default)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("/work/cache/models/rectify"))
    p.add_argument("--floors", action="store_true",
                   help="repair nothing: measure each backdoored model's no-trigger ASR (ordinary confusion into the "
                        "target) and write <out>-floors.md")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rectify")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.triggers, args.seeds, args.methods = (QUICK["datasets"], QUICK["triggers"], QUICK["seeds"],
                                                                  QUICK["methods"])
        if args.out.name == "rectify":
            args.out = args.out.with_name("rectify-quick")
    torch.set_num_threads(args.threads)
    if args.floors:
        return write_floors(args)
    rows = []
    for ds in args.datasets:
        for trig in args.triggers:
            for seed in args.seeds:
                model, info = cached_model(args.cache, ds, args.arch, trig, seed, args.device, args.epochs)
                for label in args.methods:
                    r = run_one(model, info, label, seed, args.device, args.eval_limit)
                    rows.append({"dataset": ds, "trigger": trig, "method": label, "seed": seed, **r})
                    print(f"{ds} {trig} s{seed} {label}: C-Acc {r['clean_accuracy']:.4f} ASR {r['asr']:.4f} "
                          f"({r['repair_seconds']:.1f}s) {r['layers']}", flush=True)
                    write_outputs(rows, args.out, args)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
