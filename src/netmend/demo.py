"""`netmend demo`: the whole flow on embedded data in about a minute.

Trains a small CNN on scikit-learn's bundled 8×8 digits with a BadNets trigger (10% poisoning,
target 0), then repairs it with every registered method and writes a run folder per method, a
summary (JSON) and one HTML report comparing them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from . import api
from .data.datasets import load_dataset, split_indices
from .data.triggers import TriggerSpec, build_trigger
from .defects.backdoor import BackdoorDefect, BackdoorOptions
from .errors import NetmendError
from .modelio import save_model_folder, write_json
from .registry import METHODS
from .report.html import write_report
from .report.record import write_run
from .train import TrainConfig, train_backdoored

DEMO = {"dataset": "digits", "arch": "small-cnn", "target": 0, "poison_rate": 0.1, "epochs": 30,
        "trigger": TriggerSpec(kind="badnets", size=2, position="br"),
        # digits is small (1 347 training images): hold out 30 % of them as clean repair data, and half of what a
        # method sees for validation, so the acceptance gate's one-point budget is a fraction of one validation
        # sample (168 samples: 0.6 point each) rather than several points per sample (27 with the defaults)
        "pool_fraction": 0.3, "repair_fraction": 0.25, "val_fraction": 0.5}


def run_demo(out: str | Path, seed: int = 0, methods: list[str] | None = None, quiet: bool = False,
             log: Callable[..., Any] = print) -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise NetmendError(f"demo folder {out} is not empty; choose a new --out")
    names = methods or [n for n in METHODS.names() if METHODS.get(n).applies_to("backdoor")]
    for n in names:
        METHODS.entry(n)
    t_start = time.perf_counter()
    data = load_dataset(DEMO["dataset"])
    cfg = TrainConfig(epochs=DEMO["epochs"], seed=seed)
    log(f"training {DEMO['arch']} on {DEMO['dataset']} with a BadNets trigger ({DEMO['poison_rate']:.0%} poisoned) ...")
    model, info = train_backdoored(DEMO["dataset"], DEMO["arch"], DEMO["trigger"], DEMO["target"], DEMO["poison_rate"],
                                   cfg, data=data, pool_fraction=DEMO["pool_fraction"])
    save_model_folder(out / "model", model, info)
    splits = split_indices(len(data.y_train), info["split_seed"], info["pool_fraction"])
    trigger = build_trigger(DEMO["trigger"], data.in_shape)
    results, skipped = [], {}
    before = None
    for name in names:
        defect = BackdoorDefect(data, splits, trigger, DEMO["target"],
                                BackdoorOptions(pairs=1, repair_fraction=DEMO["repair_fraction"],
                                                val_fraction=DEMO["val_fraction"], seed=seed))
        before = before or defect.metrics(model)
        log(f"repairing with {name} ...")
        try:
            result = api.repair(model, defect, method=name, seed=seed, before=before)
        except (NetmendError, NotImplementedError) as exc:
            skipped[name] = str(exc)
            log(f"  {name} skipped: {exc}")
            continue
        write_run(out / "runs" / name, info, result, source=str(out / "model"), defect=defect,
                  command=f"netmend demo --seed {seed} --only {name} --out NEW_FOLDER   "
                          f"# this run alone: the same model (same seed), then {name}")
        results.append(result.summary())
    summary = {"model": {"dataset": DEMO["dataset"], "arch": DEMO["arch"], "target": DEMO["target"],
                         "poison_rate": DEMO["poison_rate"], "trigger": DEMO["trigger"].to_json(), "seed": seed,
                         "folder": str(out / "model")},
               "results": results, "skipped": skipped, "seconds": time.perf_counter() - t_start,
               "versions": api.versions(), "out": str(out)}
    write_json(out / "summary.json", summary)
    command = f"netmend demo --seed {seed}" + (f" --only {','.join(methods)}" if methods else "") + f" --out {out}"
    write_report([out / "runs" / r["method"] for r in results], out / "report.html",
                 "netmend demo: backdoored digits CNN, every method", skipped=skipped,
                 extra={"command": command})
    return summary
