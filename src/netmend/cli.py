"""`netmend demo | train | repair | locate | evaluate | methods | report` — the user's path.

A user's mistake (missing file, unknown name, bad shape, occupied --out) prints one line on stderr
and exits with code 2; nothing is written or overwritten.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import jsonsafe
from .devices import check_device
from .errors import NetmendError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Repair trained PyTorch networks without retraining: localise, edit, verify.")
out_console = Console(width=max(Console().width, 150))


@app.callback()
def options(threads: Optional[int] = typer.Option(
        None, "--threads", envvar="NETMEND_THREADS",
        help="CPU threads torch may use (default: torch's choice, one per core); where other jobs hold cores, 1 "
             "keeps threads from waiting on each other and is often far faster"),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines on stderr")) -> None:
    """Options for every command: `netmend --threads 1 repair ...`."""
    from .registry import load_plugins

    load_plugins()
    if quiet:
        os.environ["NETMEND_QUIET"] = "1"
    if threads is not None:
        if threads < 1:
            raise NetmendError(f"--threads must be ≥ 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _kv(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """Parse repeated `key=value` options; values are read as JSON when they parse, else as strings."""
    result: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise NetmendError(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            result[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            result[k.strip().replace("-", "_")] = v
    return result


def _finite(**options: Any) -> None:
    """Float command-line options must be finite numbers (typer reads 'nan' and 'inf' as floats)."""
    import math

    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NetmendError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def load_any_model(path: str, weights: str | None = None, own: bool = False) -> tuple[Any, dict[str, Any]]:
    from .modelio import load_any_model as load

    return load(path, weights, own)


def _user_defect(net, info: dict[str, Any], data: str | None, evidence: str | None, kind: str | None,
                 label_column: str | None, protected: str | None, normalize: str | None, target: int | None,
                 pairs: int | None, seed: int, test_fraction: float | None, options: dict[str, Any],
                 test_data: str | None = None):
    """The defect from the user's files; a run folder of a user model remembers the files it was repaired with."""
    from .defects.capabilities import Targeted
    from .defects.user import defect_from_files

    given = {"data": data, "evidence": evidence, "label_column": label_column, "protected": protected,
             "normalize": normalize, "target": target, "test_fraction": test_fraction, "test_data": test_data}
    remembered = info.get("user_data") or {}
    if data is None and not remembered.get("data"):
        raise NetmendError("this model has no data netmend knows: give --data (and --evidence or --protected)")
    if data is None:
        given = {**remembered, **{k: v for k, v in given.items() if v is not None}}
        kind = kind or remembered.get("kind")
    given = {k: (str(Path(v).resolve()) if k in ("data", "evidence", "test_data") and v is not None and Path(v).exists()
                 else v)
             for k, v in given.items() if k not in ("kind", "pairs")}
    if given.get("test_fraction") is None:
        given["test_fraction"] = 0.2
    if pairs is None and data is None:
        pairs = remembered.get("pairs")
    defect = defect_from_files(net, kind=kind, pairs=pairs, seed=seed, options=options, **given)
    # what a later `netmend evaluate RUN` needs to measure the same way: the target a repair was judged against
    # (not re-derived from the repaired model) and the evidence it held out
    info["user_data"] = {**{k: v for k, v in given.items() if v is not None}, "kind": defect.kind,
                         **({"pairs": pairs} if pairs is not None else {}),
                         **({"target": defect.target} if isinstance(defect, Targeted) and defect.target is not None else {})}
    return defect


def _wants_own_data(info: dict[str, Any], data: str | None) -> bool:
    return data is not None or "user_data" in info or info.get("model_form") is not None


def build_defect(info: dict[str, Any], kind: str | None, data_dir: str | None, given: dict[str, Any], model=None):
    """The defect for a model: its recorded kind (or --defect), with the options the user gave."""
    import dataclasses

    from .api import defect_for
    from .registry import DEFECTS

    kind = kind or info.get("defect", {}).get("kind")
    if kind in (None, "clean"):
        raise NetmendError("this model records no defect; name one with --defect KIND")
    entry = DEFECTS.entry(kind)
    from .schema import check_defect_fields

    check_defect_fields(info, kind)          # a broken model.json is named before the flags (defect_for checks again)
    fields = {f.name for f in dataclasses.fields(entry.config)} if entry.config else set()
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - fields)
    if unknown:                          # named as the command's flags, before the defect checks its own options
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise NetmendError(f"{flags} does not apply to a {kind} defect (its options: {', '.join(sorted(fields)) or 'none'})")
    return defect_for(info, data_dir=data_dir, model=model, kind=kind, **given)


def _print_result_table(results: list[dict[str, Any]], title: str) -> None:
    keys: list[str] = []
    for r in results:
        for k, v in r["after"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("n_") and k not in keys:
                keys.append(k)
    keys = keys[:5]
    table = Table(title=title)
    table.add_column("method")
    for k in keys:
        table.add_column(f"{k}\nbefore → after", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("samples", justify="right")

    def fmt(v):
        if isinstance(v, float):
            return f"{100 * v:.2f}%" if 0 <= v <= 1 else f"{v:.4g}"
        return "" if v is None else str(v)

    for r in results:
        rejected = r.get("accepted") is False
        after = r.get("candidate_after") or r["after"] if rejected else r["after"]
        label = f"{r['method']}\n[red]rejected[/red]" if rejected else r["method"]
        table.add_row(label, *[f"{fmt(r['before'].get(k))} → {fmt(after.get(k))}" for k in keys],
                      f"{r['seconds']:.2f}", str(r.get("samples_used", "")))
    out_console.print(table)
    for r in results:
        if r.get("note"):
            out_console.print(f"note: {r['method']}: {r['note']}")


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="a method, localiser or repairer: show its options")) -> None:
    """List the registered methods; with NAME, its localiser, repairer, every option and the defects it fits."""
    from .registry import LOCALISERS, METHODS, REPAIRERS

    if name is not None:
        _describe_component(name)
        return
    table = Table(title="methods")
    table.add_column("name")
    table.add_column("localiser → repairer")
    table.add_column("description")
    for e in METHODS.entries():
        table.add_row(e.name, f"{e.obj.localiser or '-'} → {e.obj.repairer}", e.description)
    out_console.print(table)
    out_console.print("localisers: " + ", ".join(LOCALISERS.names()))
    out_console.print("repairers:  " + ", ".join(REPAIRERS.names()))
    out_console.print("netmend methods NAME shows one method's options")


def _options_table(title: str, entry, preset_options: dict[str, Any], flag: str) -> None:
    from .registry import config_options

    docs = config_options(entry.config)
    if not docs:
        out_console.print(f"{title}: {entry.name} (no options)")
        return
    table = Table(title=f"{title}: {entry.name} — {entry.description}  ({flag} key=value)", title_justify="left")
    for c in ("option", "type", "default", "help"):
        table.add_column(c, overflow="fold")
    for o in docs:
        default = preset_options.get(o.name, o.default)
        mark = " (preset)" if o.name in preset_options else ""
        table.add_row(o.name, o.type, f"{default!r}{mark}", o.help)
    out_console.print(table)


def _describe_component(name: str) -> None:
    from .registry import DEFECTS, LOCALISERS, METHODS, REPAIRERS

    if name in METHODS:
        e = METHODS.entry(name)
        preset = e.obj
        kinds = ", ".join(preset.defects) if preset.defects else "any defect kind its parts accept (" + \
            ", ".join(DEFECTS.names()) + ")"
        out_console.print(f"[bold]{name}[/bold] — {e.description}")
        out_console.print(f"localiser: {preset.localiser or '-'}   repairer: {preset.repairer}   "
                          f"reads evidence pairs: {'yes' if preset.uses_pairs else 'no'}"
                          + (f"   paper: {preset.paper}" if preset.paper else ""))
        out_console.print(f"defects: {kinds}")
        if preset.localiser:
            _options_table("localiser", LOCALISERS.entry(preset.localiser), preset.locate_options, "-L")
        _options_table("repairer", REPAIRERS.entry(preset.repairer), preset.repair_options, "-R")
        return
    for reg, title, flag in ((LOCALISERS, "localiser", "-L"), (REPAIRERS, "repairer", "-R")):
        if name in reg:
            _options_table(title, reg.entry(name), {}, flag)
            return
    known = ", ".join(METHODS.names() + LOCALISERS.names() + REPAIRERS.names())
    raise NetmendError(f"unknown method, localiser or repairer {name!r}; known: {known}")


@app.command()
def train(
    dataset: str = typer.Option(..., help="dataset name (netmend methods lists none; see README)"),
    arch: str = typer.Option(..., help="architecture: mlp, small-cnn, preact-resnet18, vgg11"),
    out: Path = typer.Option(..., help="new model folder to write"),
    data_dir: Optional[str] = typer.Option(None, help="data folder (else $NETMEND_DATA)"),
    trigger: str = typer.Option("badnets", help="badnets | blended | wanet | sig | lc | none"),
    trigger_size: int = typer.Option(3), trigger_position: str = typer.Option("br"),
    trigger_pattern: str = typer.Option("white"), blend_alpha: float = typer.Option(0.2),
    target: int = typer.Option(0), poison_rate: float = typer.Option(0.1),
    epochs: Optional[int] = typer.Option(None, help="default: 8 for mlp/small-cnn, 30 otherwise"),
    recipe: str = typer.Option("netmend", help="image models: netmend (Adam, fast on a CPU) | field (SGD, cosine "
                                                "schedule, random crop + flip, bfloat16 on a GPU: the literature's "
                                                "CIFAR recipe)"),
    seed: int = typer.Option(0), device: str = typer.Option("cpu"),
    protected: Optional[str] = typer.Option(None, help="tabular datasets: protected attribute(s)"),
    spurious_class: Optional[int] = typer.Option(None, help="spurious correlation instead of a backdoor: stamp the "
                                                 "trigger on part of this class's images, labels kept"),
    spurious_fraction: float = typer.Option(0.5, help="with --spurious-class: share of that class's images stamped"),
    mislabel_class: Optional[int] = typer.Option(None, help="wrong predictions instead of a backdoor: label part of "
                                                 "this class's training images as --mislabel-as (no trigger)"),
    mislabel_as: int = typer.Option(0, help="with --mislabel-class: the wrong label they get"),
    mislabel_fraction: float = typer.Option(0.4, help="with --mislabel-class: share of that class's labels changed"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Train a (backdoored, biased, mislabelled or, for blockmnist, leaking) model reproducibly and save a model folder."""
    from .data.triggers import TriggerSpec
    from .modelio import check_fresh_out, save_model_folder
    from .registry import DATASETS
    from .train import RECIPES, TrainConfig, default_epochs, train_backdoored

    check_fresh_out(out)
    if recipe not in RECIPES:
        raise NetmendError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    check_device(device)
    _finite(blend_alpha=blend_alpha, poison_rate=poison_rate, spurious_fraction=spurious_fraction,
            mislabel_fraction=mislabel_fraction)
    if epochs is not None and epochs < 1:
        raise NetmendError(f"--epochs must be ≥ 1, got {epochs}")
    if not 0 <= poison_rate <= 1:
        raise NetmendError(f"--poison-rate must be in [0, 1], got {poison_rate}")
    entry = DATASETS.entry(dataset)
    if entry.extra.get("trainer"):
        if spurious_class is not None or mislabel_class is not None:
            flag = "--spurious-class" if spurious_class is not None else "--mislabel-class"
            raise NetmendError(f"{flag} applies to image datasets, not {dataset}")
        if recipe != "netmend":
            raise NetmendError(f"--recipe applies to image datasets, not {dataset}")
        extra = {"protected": protected} if protected else {}
        model, info = entry.extra["trainer"](dataset=dataset, arch=arch, seed=seed, epochs=epochs, device=device,
                                             data_dir=data_dir, **extra)
    else:
        if protected:
            raise NetmendError(f"--protected applies to tabular datasets, not {dataset}")
        spec = None if trigger == "none" else TriggerSpec(kind=trigger, size=trigger_size, position=trigger_position,
                                                          pattern=trigger_pattern, alpha=blend_alpha, seed=seed)
        from .registry import check_config

        cfg = check_config(TrainConfig(epochs=epochs if epochs is not None else default_epochs(arch, dataset),
                                       seed=seed, **RECIPES[recipe]), "netmend train")
        if mislabel_class is not None:
            from .defects.wrong_predictions import train_mislabelled

            if spurious_class is not None:
                raise NetmendError("--mislabel-class and --spurious-class train different defects: give one")
            model, info = train_mislabelled(dataset, arch, mislabel_class, mislabel_as, mislabel_fraction, cfg, device,
                                            data_dir)
        elif spurious_class is not None:
            from .defects.spurious import train_spurious

            if spec is None:
                raise NetmendError("--spurious-class needs a pattern: give --trigger badnets, blended or wanet")
            model, info = train_spurious(dataset, arch, spec, spurious_class, spurious_fraction, cfg, device, data_dir)
        else:
            model, info = train_backdoored(dataset, arch, spec, target, poison_rate, cfg, device, data_dir)
    save_model_folder(out, model, info)
    if json_out:
        print(jsonsafe.dumps({"out": str(out), "metrics": info.get("metrics", {}), "seconds": info.get("training", {}).get("seconds")}))
    else:
        out_console.print(f"saved {out}: " + ", ".join(f"{k} {v:.4f}" for k, v in info.get("metrics", {}).items()
                                                      if isinstance(v, float)))


def _defect_options(pairs, repair_fraction, seed, prop, protected, defect_opts) -> dict[str, Any]:
    given = {"pairs": pairs, "repair_fraction": repair_fraction, "property": prop, "protected": protected}
    given.update(_kv(defect_opts, "-d"))
    return given


# Options shared by repair / evaluate / locate for a user's own model and data.
WEIGHTS_OPT = typer.Option(None, "--weights", help="package.module:factory models: the weights (safetensors or a "
                                                   "state dict, read with weights_only=True)")
DATA_OPT = typer.Option(None, "--data", help="your clean data: FILE.npz (x, y[, x_test, y_test]), an image folder / "
                                             "tar.gz of <class>/ folders, or FILE.csv with --label-column")
EVIDENCE_OPT = typer.Option(None, "--evidence", help="FILE.npz with triggered + clean [+ labels] (a backdoor) or x + y "
                                                     "(misclassified inputs, right labels); or a folder with "
                                                     "triggered/ and clean/ images paired by name")
LABEL_OPT = typer.Option(None, "--label-column", help="CSV data: the column holding the class")
NORMALIZE_OPT = typer.Option(None, "--normalize", help="images: MEAN,STD (or C means then C stds) the model expects; "
                                                       "applied to data and evidence, recorded in config.json")
TARGET_OPT = typer.Option(None, "--target", help="backdoor target class (default: the model's majority prediction "
                                                 "on the triggered evidence)")
TEST_DATA_OPT = typer.Option(None, "--test-data", help="your evaluation data, in --data's format (default: a seeded "
                                                      "share of --data is held out)")
TEST_FRACTION_OPT = typer.Option(None, "--test-fraction", help="share of --data held out for evaluation when it has "
                                                               "no x_test / y_test (default 0.2, seeded)")


def _load_model_and_defect(model, weights, data, evidence, defect, label_column, normalize, target, test_fraction,
                           pairs, repair_fraction, seed, prop, protected, defect_opt, data_dir, seed_default=True,
                           test_data=None):
    """(model, info, defect) for any model form and either netmend's recorded data or the user's files."""
    net, info = load_any_model(model, weights, own=data is not None)
    if _wants_own_data(info, data):
        if repair_fraction is not None:
            raise NetmendError("--repair-fraction applies to netmend's datasets; with --data every sample you give "
                               "is repair data (less the held-out test share)")
        if prop is not None:
            raise NetmendError("--property applies to ACAS Xu networks (.nnet / .onnx) without --data")
        d = _user_defect(net, info, data, evidence, defect, label_column, protected, normalize, target, pairs, seed,
                         test_fraction, _kv(defect_opt, "-d"), test_data)
        return net, info, d
    for flag, value in (("--evidence", evidence), ("--label-column", label_column), ("--normalize", normalize),
                        ("--target", target), ("--test-fraction", test_fraction), ("--test-data", test_data)):
        if value is not None:
            raise NetmendError(f"{flag} applies with --data (your own data); this model uses netmend's recorded data")
    seed_opt = {"seed": seed} if (seed_default and _has_field(info, defect, "seed")) else {}
    d = build_defect(info, defect, data_dir, {**seed_opt, **_defect_options(pairs, repair_fraction, None, prop,
                                                                             protected, defect_opt)}, model=net)
    return net, info, d


@app.command()
def repair(
    model: str = typer.Argument(..., help="model folder, run folder, network file (.nnet, .onnx, .pt2) or "
                                          "package.module:factory"),
    out: Path = typer.Option(..., help="new run folder to write"),
    method: Optional[str] = typer.Option(None, help="method preset (netmend methods); default rectify"),
    locate: Optional[str] = typer.Option(None, "--locate", help="localiser (overrides the preset's)"),
    repairer: Optional[str] = typer.Option(None, "--repair", help="repairer (overrides the preset's)"),
    pairs: Optional[int] = typer.Option(None, help="evidence pairs x̃ → x the method sees"),
    repair_fraction: Optional[float] = typer.Option(None, help="clean repair data, as a fraction of the training set"),
    seed: int = typer.Option(0), device: str = typer.Option("cpu"),
    defect: Optional[str] = typer.Option(None, help="defect kind, when not the one the model records"),
    prop: Optional[str] = typer.Option(None, "--property", help="safety property (.vnnlib)"),
    protected: Optional[str] = typer.Option(None, help="fairness: protected attribute(s)"),
    weights: Optional[str] = WEIGHTS_OPT, data: Optional[str] = DATA_OPT, evidence: Optional[str] = EVIDENCE_OPT,
    label_column: Optional[str] = LABEL_OPT, normalize: Optional[str] = NORMALIZE_OPT,
    target: Optional[int] = TARGET_OPT, test_fraction: Optional[float] = TEST_FRACTION_OPT,
    test_data: Optional[str] = TEST_DATA_OPT,
    defect_opt: Optional[list[str]] = typer.Option(None, "-d", help="defect option key=value (repeatable)"),
    locate_opt: Optional[list[str]] = typer.Option(None, "-L", help="localiser option key=value (repeatable)"),
    repair_opt: Optional[list[str]] = typer.Option(None, "-R", help="repairer option key=value (repeatable)"),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="acceptance gate: most accuracy points "
                                            "(fidelity for safety) the repair may lose on held-apart repair data"),
    keep_rejected: bool = typer.Option(False, "--keep-rejected", help="write a candidate the gate rejects anyway, "
                                       "marked as rejected (exit code still 3)"),
    no_gate: bool = typer.Option(False, "--no-gate", help="skip the acceptance gate (not recommended)"),
    certify: bool = typer.Option(False, "--certify", help="safety: verify every candidate with the complete verifier; "
                                 "its counterexamples join the evidence and the repair reruns until verified"),
    certify_rounds: int = typer.Option(3, "--certify-rounds", help="with --certify: repairs after the first, at most"),
    verify_timeout: float = typer.Option(60.0, "--verify-timeout", help="with --certify: seconds per verification"),
    data_dir: Optional[str] = typer.Option(None), json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Localise and repair a model's defect; write a run folder and print before/after metrics.

    Exit codes: 0 repaired, 2 a mistake in the input, 3 the repair was rejected by the acceptance gate (the run
    folder then holds the input model and the rejected candidate's metrics)."""
    from . import api
    from .modelio import check_fresh_out
    from .registry import LOCALISERS, METHODS, REPAIRERS
    from .report.record import command_line, write_run

    check_fresh_out(out)
    check_device(device)
    _finite(repair_fraction=repair_fraction, test_fraction=test_fraction, verify_timeout=verify_timeout)
    if certify and (verify_timeout <= 0 or certify_rounds < 0):
        raise NetmendError(f"--verify-timeout must be > 0 and --certify-rounds ≥ 0, got {verify_timeout} and "
                           f"{certify_rounds}")
    if not 0 <= max_accuracy_drop <= 100 or max_accuracy_drop != max_accuracy_drop:
        raise NetmendError(f"--max-accuracy-drop takes accuracy points in [0, 100], got {max_accuracy_drop}")
    if method is None and repairer is None:
        method = "rectify" if "rectify" in METHODS else "finetune"
    if method is not None:
        METHODS.entry(method)
    if locate:
        LOCALISERS.entry(locate)
    if repairer:
        REPAIRERS.entry(repairer)
    net, info, d = _load_model_and_defect(model, weights, data, evidence, defect, label_column, normalize, target,
                                          test_fraction, pairs, repair_fraction, seed, prop, protected, defect_opt,
                                          data_dir, test_data=test_data)
    kwargs = dict(method=method, localiser=locate, repairer=repairer, locate_options=_kv(locate_opt, "-L"),
                  repair_options=_kv(repair_opt, "-R"), seed=seed, device=device,
                  max_accuracy_drop=max_accuracy_drop / 100, gate=not no_gate)
    if certify:
        from .certify import certified_repair

        if d.kind != "safety":
            raise NetmendError(f"--certify proves safety properties (--property); a {d.kind} defect has none to prove")
        result = certified_repair(net, d, rounds=certify_rounds, verify_timeout=verify_timeout,
                                  keep_rejected=keep_rejected, **kwargs)
    else:
        result = api.repair(net, d, keep_rejected=keep_rejected, **kwargs)
    write_run(out, info, result, source=str(model), defect=d, command=command_line())
    summary = result.summary()
    if json_out:
        print(jsonsafe.dumps(summary))
    else:
        _print_result_table([summary], f"netmend repair → {out}")
    if not result.accepted:
        print(f"repair rejected: {result.gate['reason']}", file=sys.stderr)
        raise typer.Exit(3)


def _has_field(info, kind, name) -> bool:
    import dataclasses

    from .registry import DEFECTS

    kind = kind or info.get("defect", {}).get("kind")
    if kind not in DEFECTS:
        return False
    cfg = DEFECTS.entry(kind).config
    return cfg is not None and name in {f.name for f in dataclasses.fields(cfg)}


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="model folder, run folder, network file or package.module:factory"),
    defect: Optional[str] = typer.Option(None), prop: Optional[str] = typer.Option(None, "--property"),
    protected: Optional[str] = typer.Option(None), defect_opt: Optional[list[str]] = typer.Option(None, "-d"),
    weights: Optional[str] = WEIGHTS_OPT, data: Optional[str] = DATA_OPT, evidence: Optional[str] = EVIDENCE_OPT,
    label_column: Optional[str] = LABEL_OPT, normalize: Optional[str] = NORMALIZE_OPT,
    target: Optional[int] = TARGET_OPT, test_fraction: Optional[float] = TEST_FRACTION_OPT,
    test_data: Optional[str] = TEST_DATA_OPT,
    pairs: Optional[int] = typer.Option(None, help="with --data: evidence pairs set aside as a repair would"),
    seed: int = typer.Option(0),
    data_dir: Optional[str] = typer.Option(None), json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Measure a model's defect metrics on the held-out evaluation data."""
    net, info, d = _load_model_and_defect(model, weights, data, evidence, defect, label_column, normalize, target,
                                          test_fraction, pairs, None, seed, prop, protected, defect_opt, data_dir,
                                          seed_default=False, test_data=test_data)
    d.prepare(net)
    t0 = time.perf_counter()
    m = d.metrics(net)
    scalars = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}
    if json_out:
        print(jsonsafe.dumps({"model": model, "metrics": scalars, "seconds": time.perf_counter() - t0}))
    else:
        table = Table(title=f"netmend evaluate {model}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in scalars.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        out_console.print(table)


def _list_layers(net) -> None:
    """Every named module with parameters or an activation: the names -L layer=... and sites use."""
    table = Table(title="layers (dotted names, in registration order)")
    for c in ("name", "type", "parameters"):
        table.add_column(c)
    for name, m in net.named_modules():
        if not name or list(m.children()):
            continue
        shapes = ", ".join(f"{k} {tuple(p.shape)}" for k, p in m.named_parameters(recurse=False))
        table.add_row(name, type(m).__name__, shapes)
    out_console.print(table)


@app.command("locate")
def locate_cmd(
    model: str = typer.Argument(...),
    localiser: Optional[str] = typer.Option(None, "--locate", help="localiser name"),
    list_layers: bool = typer.Option(False, "--list-layers", help="only list the model's layers by name"),
    pairs: Optional[int] = typer.Option(None), repair_fraction: Optional[float] = typer.Option(None),
    defect: Optional[str] = typer.Option(None), prop: Optional[str] = typer.Option(None, "--property"),
    protected: Optional[str] = typer.Option(None), defect_opt: Optional[list[str]] = typer.Option(None, "-d"),
    weights: Optional[str] = WEIGHTS_OPT, data: Optional[str] = DATA_OPT, evidence: Optional[str] = EVIDENCE_OPT,
    label_column: Optional[str] = LABEL_OPT, normalize: Optional[str] = NORMALIZE_OPT,
    target: Optional[int] = TARGET_OPT, test_fraction: Optional[float] = TEST_FRACTION_OPT,
    test_data: Optional[str] = TEST_DATA_OPT,
    locate_opt: Optional[list[str]] = typer.Option(None, "-L"), seed: int = typer.Option(0),
    device: str = typer.Option("cpu"), top: int = typer.Option(10), data_dir: Optional[str] = typer.Option(None),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Rank the layers / neurons / weights responsible for a model's defect (no edit)."""
    from . import api

    check_device(device)
    if list_layers:
        net, _ = load_any_model(model, weights, own=True)
        if json_out:
            print(jsonsafe.dumps([{"name": n, "type": type(m).__name__,
                               "parameters": {k: list(p.shape) for k, p in m.named_parameters(recurse=False)}}
                              for n, m in net.named_modules() if n and not list(m.children())]))
        else:
            _list_layers(net)
        return
    if localiser is None:
        raise NetmendError("name a localiser with --locate NAME (netmend methods lists them), or give --list-layers")
    from .registry import LOCALISERS

    LOCALISERS.entry(localiser)
    net, info, d = _load_model_and_defect(model, weights, data, evidence, defect, label_column, normalize, target,
                                          test_fraction, pairs, repair_fraction, seed, prop, protected, defect_opt,
                                          data_dir, seed_default=False, test_data=test_data)
    d.prepare(net)
    sites = api.locate(net, d, localiser, _kv(locate_opt, "-L"), seed, device)
    if json_out:
        print(jsonsafe.dumps(sites.to_json()))
        return
    table = Table(title=f"{localiser}: top {top} of {len(sites)} sites ({sites.seconds:.2f} s)")
    for c in ("rank", "layer", "kind", "index", "score"):
        table.add_column(c)
    for i, s in enumerate(sites.sites[:top], 1):
        table.add_row(str(i), s.layer, s.kind, "" if s.index is None else str(s.index), f"{s.score:.4g}")
    out_console.print(table)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="run folder for the demo (default: a new folder under ./netmend-demo)"),
    json_out: bool = typer.Option(False, "--json"),
    seed: int = typer.Option(0),
    only: Optional[str] = typer.Option(None, help="comma-separated methods (default: every registered method)"),
) -> None:
    """Train a backdoored CNN on the embedded digits data and repair it with every method."""
    from .demo import run_demo

    out = out or _fresh_demo_dir()
    results = run_demo(out, seed=seed, methods=only.split(",") if only else None, quiet=json_out,
                       log=(lambda *_: None) if json_out else out_console.print)
    if json_out:
        print(jsonsafe.dumps(results))
    else:
        _print_result_table(results["results"], f"netmend demo: {results['model']['dataset']} / {results['model']['arch']}, "
                                                f"BadNets → class {results['model']['target']}")
        out_console.print(f"report: {Path(out) / 'report.html'}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="run folders (or folders of them, such as a demo's)"),
    out: Path = typer.Option(..., "--out", help="the HTML file to write (.html)"),
    title: Optional[str] = typer.Option(None, help="page title (comparisons)"),
) -> None:
    """Write one self-contained HTML report: of a run folder, or comparing several (no network, pictures inline)."""
    from .report.html import run_folders, write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise NetmendError(f"--out names the HTML file to write and must end in .html, got {out}")
    if out.is_dir():
        raise NetmendError(f"--out {out} is a folder; name the HTML file to write")
    folders = run_folders(runs)
    t0 = time.perf_counter()
    write_report(folders, out, title)
    kind = "report" if len(folders) == 1 else f"comparison of {len(folders)} runs"
    out_console.print(f"{kind}: {out} ({out.stat().st_size / 1024:.0f} KB, {time.perf_counter() - t0:.2f} s)")


@app.command()
def bench(
    grid: Path = typer.Argument(..., help="the grid file (TOML): datasets × archs × attacks, or model folders; × "
                                          "methods × seeds"),
    out: Path = typer.Option(..., "--out", help="a new or empty folder, or this grid's earlier output (resumes: "
                                                "only the missing cells run)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="local worker processes, one torch thread each "
                                                                  "(default: one per CPU core)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run the cells as Ray tasks: auto (the running cluster), "
                                                          "ADDRESS, or local (start one here)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="trained-model cache, keyed by each training recipe's "
                                                               "hash (default: OUT/models)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="run at most N missing cells, then stop"),
    only: Optional[str] = typer.Option(None, "--only", help="run only these methods' cells (labels as the grid "
                                                            "names them, comma-separated)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON summary"),
) -> None:
    """Run an experiment grid: train (or load) each model once, repair it with every method and seed, and write
    results.csv, results.md (mean ± std over seeds) and a comparison report. Exit 1 when a cell failed."""
    from .bench import run_bench

    if workers is not None and ray is not None:
        raise NetmendError("--workers sets local workers; with --ray the cluster's CPUs set the parallelism")
    summary = run_bench(grid, out, workers=workers, ray=ray, cache=cache, limit=limit,
                        only=[m.strip() for m in only.split(",") if m.strip()] if only else None,
                        log=(lambda *_: None) if json_out else (lambda s: out_console.print(s, markup=False)))
    if json_out:
        print(jsonsafe.dumps(summary))
    else:
        out_console.print(f"{len(summary['ran'])} cells run ({len(summary['failed'])} failed), "
                          f"{len(summary['done_before'])} done before, {len(summary['left'])} left, "
                          f"{summary['seconds']:.1f} s; tables: {Path(out) / 'results.md'}, report: "
                          f"{Path(out) / 'report.html'}")
    if summary["failed"]:
        raise typer.Exit(1)


def _register_verify() -> None:
    """`netmend verify MODEL --property P`: the complete verifier (netmend.verify), its options from its own module."""
    from .verify.command import verify_command

    app.command("verify", help="Prove a safety property (verified), find a checked counterexample (violated), or say "
                               "unknown at the timeout. Exit 0 / 1 / 3.")(verify_command)


_register_verify()


def _fresh_demo_dir() -> Path:
    base = Path("netmend-demo")
    i = 0
    while (base / f"run{i}").exists():
        i += 1
    return base / f"run{i}"


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that half-built folders are cleaned up on the way out. A
    BaseException, as KeyboardInterrupt: code that records a failure and goes on (a `netmend bench` cell) must not
    take it for one."""


def _on_sigterm(_signum, _frame):
    raise Terminated()


def main() -> None:
    """Console-script entry: user mistakes become one line on stderr and exit code 2; an interrupted run exits
    130 (SIGINT) or 143 (SIGTERM) with one line, its half-built run folder removed."""
    import signal

    from .memory import keep_freed_memory

    keep_freed_memory()                  # a command: keep freed memory in the process (netmend/memory.py)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)   # netmend/__init__ held it while loading
    try:
        code = app(standalone_mode=False)          # click returns a typer.Exit's code instead of raising it
        if code == 130:                            # typer turned a Ctrl-C into Exit(130)
            print("netmend: interrupted", file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NetmendError as exc:
        print(f"netmend: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except typer.Abort as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            print("netmend: interrupted", file=sys.stderr)
            sys.exit(130)
        print("netmend: aborted", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print("netmend: terminated", file=sys.stderr)
        sys.exit(143)
    except typer.exceptions.TyperException as exc:     # usage errors: missing / bad options
        msg = " ".join(str(exc.format_message()).split())
        print(f"netmend: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("netmend: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
