"""Grid files for `netmend bench`: TOML read into strict pydantic models, checked against the registries and
expanded into cells — all before anything is written, so a mistake costs one line and no half-made folder."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import NetmendError, first_line


class _Strict(BaseModel):
    # strict: a "3" in a number field is a mistake to name, not something to coerce quietly
    model_config = ConfigDict(extra="forbid", strict=True)


_TRIGGER = ("kind", "size", "position", "margin", "pattern", "alpha", "pattern_seed", "params")
ATTACK_FIELDS = {"backdoor": (*_TRIGGER, "target", "poison_rate"),       # the fields each kind of attack reads
                 "spurious": (*_TRIGGER, "cue_class", "fraction"), "leakage": ("null", "layout_seed"),
                 "clean": (), "mislabelled": ("source_class", "as_class", "fraction")}
MISLABELLED = ("source_class", "as_class")      # added after spurious and leakage grids were hashed: out of their hash
NOT_BACKDOOR = ("defect", "cue_class", "fraction", "null", "layout_seed", *MISLABELLED)  # added after backdoor grids
# The defect a trained model records: what its cells repair unless their `defect` options name another kind. A clean
# model records none, so its cells must name one.
RECORDS = {"backdoor": "backdoor", "spurious": "spurious", "leakage": "leakage", "clean": None,
           "mislabelled": "wrong-predictions"}


class Attack(_Strict):
    """What training plants. A backdoor (default): a trigger (netmend's TriggerSpec fields), the target class and the
    poison rate. A spurious cue: the same trigger fields, put on a `fraction` of class `cue_class`'s training images
    with their labels kept. Feature leakage: the dataset's images become BlockMNIST's digit blocks beside a `null`
    block (nothing is poisoned; the leakage comes from training itself). A clean model: nothing planted; its cells
    repair the defect their `defect` options name (`kind = "adversarial"` or `"wrong-predictions"`). Mislabelled
    classes: a `fraction` of class `source_class`'s training labels set to `as_class` (the model records a
    wrong-predictions defect)."""
    defect: Literal["backdoor", "spurious", "leakage", "clean", "mislabelled"] = "backdoor"
    cue_class: int | None = None        # spurious: the class whose images carry the cue (default 0)
    fraction: float | None = None       # spurious: share of that class's training images that carry it (default 0.5);
                                        # mislabelled: share of source_class's training labels changed (default 0.4)
    source_class: int | None = None     # mislabelled (required): the class whose labels are changed
    as_class: int | None = None         # mislabelled (required): the label they get
    null: str | None = None             # leakage: the null block's pattern (default "square")
    layout_seed: int | None = None      # leakage: which half each image's digit takes (default 0)
    kind: str | None = None             # trigger kind; default: the attack's own name
    size: int = 3
    position: str = "br"
    margin: int = 0
    pattern: str = "white"
    alpha: float = 0.2
    pattern_seed: int | None = None     # random patterns / blend images / warps; default: the cell's seed
    params: dict[str, Any] = {}
    target: int = 0
    poison_rate: float = 0.1

    @field_validator("poison_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v


    @model_validator(mode="after")
    def _fields_of_its_defect(self) -> "Attack":
        for n in sorted(self.model_fields_set - {"defect"}):
            if n not in ATTACK_FIELDS[self.defect]:
                owners = " or ".join(k for k, v in ATTACK_FIELDS.items() if n in v)
                plants = "nothing" if self.defect == "clean" else f"a {self.defect}"
                raise ValueError(f"{n} is for a {owners} attack, this one plants {plants} "
                                 f"(defect = \"{self.defect}\")")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.defect == "mislabelled":
            missing = [n for n in MISLABELLED if getattr(self, n) is None]
            if missing:
                raise ValueError(f"a mislabelled attack needs source_class (the class whose labels change) and "
                                 f"as_class (the label they get): {' and '.join(missing)} missing")
            if min(self.source_class, self.as_class) < 0 or self.source_class == self.as_class:
                raise ValueError(f"source_class and as_class must be two different classes ≥ 0, got "
                                 f"{self.source_class} and {self.as_class}")
        return self


class Train(_Strict):
    """How models are trained (netmend's TrainConfig; the seed comes from the grid's seeds)."""
    epochs: int | None = None           # default: netmend's default for the dataset and architecture
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["constant", "cosine"] = "constant"
    augment: Literal["none", "crop-flip"] = "none"
    amp: bool = False                   # bfloat16 autocast on a GPU (the field's recipe: see TrainConfig)
    pool_fraction: float = 0.1          # training images held out as the clean pool repairs draw from

    @field_validator("pool_fraction")
    @classmethod
    def _pool(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"must be in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _numbers(self) -> "Train":
        from ..registry import check_number

        for k, v in self.model_dump().items():          # netmend's one rule: epochs, lr, batch size > 0, ...
            if v is not None:
                try:
                    check_number(k, v, "train")
                except NetmendError as exc:
                    raise ValueError(str(exc).replace(" for train", "")) from None
        return self


class Method(_Strict):
    """A repair as one column of the grid: a method preset (or localiser + repairer) with its options."""
    method: str | None = None           # preset name; default: the entry's own name
    localiser: str | None = None
    repairer: str | None = None
    locate: dict[str, Any] = {}
    repair: dict[str, Any] = {}
    defect: dict[str, Any] = {}         # defect options for this method only (e.g. pairs = 20)
    max_accuracy_drop: float = 1.0      # acceptance gate, in accuracy points (as `netmend repair`)
    gate: bool = True
    certify: bool = False               # safety: repair → verify → counterexamples → repair (as `--certify`)
    certify_rounds: int = 3
    verify_timeout: float = 60.0

    @model_validator(mode="after")
    def _certify_numbers(self) -> "Method":
        if self.certify_rounds < 0 or not self.verify_timeout > 0:
            raise ValueError("certify_rounds must be ≥ 0 and verify_timeout > 0")
        return self


class ModelFolder(_Strict):
    """An existing model folder (or a network file netmend loads, e.g. an ACAS Xu .nnet) with the seeds of its own
    cells (a model trained with seed s, repaired with seed s) and defect options of its own (e.g. the property a
    network is repaired against), between the grid's and each method's."""
    folder: str
    seeds: list[int] | None = None      # None: the grid's seeds
    defect: dict[str, Any] = {}


class Grid(_Strict):
    title: str | None = None
    seeds: list[int] = []               # every cell's seed(s); a `models` entry may name its own instead
    methods: dict[str, Method] | list[str]
    datasets: list[str] = []
    archs: list[str] = []
    attacks: dict[str, Attack] = {}
    train: Train = Train()
    models: list[str | ModelFolder] = []   # existing model folders instead of datasets × archs × attacks
    defect: dict[str, Any] = {}         # defect options shared by every method
    device: str = "cpu"
    data_dir: str | None = None

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        return {name: Method() for name in v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _shape(self) -> "Grid":
        trained = bool(self.datasets or self.archs or self.attacks)
        if trained and self.models:
            raise ValueError("give either datasets, archs and attacks (models to train) or models (existing "
                             "model folders), not both")
        if not trained and not self.models:
            raise ValueError("the grid is empty: give datasets, archs and attacks, or models")
        own = [m for m in self.models if isinstance(m, ModelFolder) and m.seeds is not None]
        needs_seeds = trained or len(own) < len(self.models)
        for key in (("datasets", "archs", "attacks") if trained else ()) + (("seeds",) if needs_seeds else ()) \
                + ("methods",):
            if not getattr(self, key):
                raise ValueError(f"the grid is empty: {key} lists nothing"
                                 + (" (or give each model its own: {folder = ..., seeds = [...]})"
                                    if key == "seeds" and self.models else ""))
        folders = [(m.folder, canonical(m.defect)) if isinstance(m, ModelFolder) else (m, "{}") for m in self.models]
        for key, values in (("seeds", self.seeds), ("datasets", self.datasets), ("archs", self.archs),
                            ("models", folders), *((f"models {m.folder!r} seeds", m.seeds) for m in own)):
            if len(set(values)) != len(values):
                raise ValueError(f"{key} lists a value twice")
        if any(not m.seeds for m in own):
            raise ValueError("a models entry lists no seeds")
        if any(s < 0 for s in [*self.seeds, *(s for m in own for s in m.seeds)]):
            raise ValueError("seeds must be ≥ 0")
        if any(not 0 <= m.max_accuracy_drop <= 100 for m in self.methods.values()):
            raise ValueError("max_accuracy_drop takes accuracy points in [0, 100]")
        return self


def canonical(obj: Any) -> str:
    """The JSON every hash is taken of: sorted keys, no spaces, so equal recipes hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_.")[:60] or "x"


@dataclass
class Cell:
    """One model × method × seed: everything a worker needs, as plain JSON-able data."""
    id: str
    coords: dict[str, Any]              # the table's key columns (dataset, arch, attack | model; method; seed)
    model_key: str
    method: dict[str, Any]
    defect: dict[str, Any]
    seed: int
    device: str
    data_dir: str | None


@dataclass
class Plan:
    grid: Grid
    path: Path
    hash: str                           # identifies the grid's output folder (resume or refuse)
    models: dict[str, dict[str, Any]]   # model key -> recipe ({"train": ...} or {"folder": ...})
    cells: list[Cell] = field(default_factory=list)


def load_grid(path: str | Path) -> Plan:
    """Read, check and expand a grid file; every mistake is one NetmendError naming the file and the key."""
    try:
        import tomllib
    except ModuleNotFoundError:          # Python 3.10: the same parser as a package (a dependency there)
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise NetmendError(f"grid file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NetmendError(f"grid {path}: not valid TOML: {first_line(exc)}") from None
    try:
        grid = Grid.model_validate(raw)
    except ValidationError as exc:
        raise NetmendError(f"grid {path}: {_one_line(exc)}") from None
    return _plan(grid, path)


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors()
    e = errors[0]
    where = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "dict[", "list[")))
    msg = {"missing": "missing key", "extra_forbidden": "unknown key"}.get(e["type"], e["msg"])
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{where}: {msg}" if where else msg) + more


def _check_options(kind: str, config: type | None, options: dict[str, Any]) -> None:
    from ..registry import make_config

    try:
        make_config(config, options)
    except NetmendError as exc:
        raise NetmendError(f"{kind}: {exc}") from None


def _check_method(label: str, m: Method, defect_kinds: set[str], defect_config, shared_defect: dict) -> dict:
    """The method's resolved recipe; unknown names and options are refused here, not in a worker."""
    from ..registry import LOCALISERS, METHODS, REPAIRERS

    where = f"methods.{label}"
    name = m.method or (None if m.repairer else label)
    preset = None
    if name:
        try:
            METHODS.entry(name)
        except NetmendError as exc:
            raise NetmendError(f"{where}: {exc}") from None
        preset = METHODS.get(name)
        bad = sorted(k for k in defect_kinds if not preset.applies_to(k))
        if bad:
            raise NetmendError(f"{where}: method {name!r} does not repair the defect {bad[0]!r}")
    loc = m.localiser if m.localiser is not None else (preset.localiser if preset else None)
    rep = m.repairer or (preset.repairer if preset else None)
    for reg, comp, opts, preset_opts in ((LOCALISERS, loc, m.locate, preset.locate_options if preset else {}),
                                         (REPAIRERS, rep, m.repair, preset.repair_options if preset else {})):
        if comp is None:
            if opts:
                raise NetmendError(f"{where}: options given for a {reg.kind} the method does not use")
            continue
        try:
            entry = reg.entry(comp)
        except NetmendError as exc:
            raise NetmendError(f"{where}: {exc}") from None
        _check_options(where, entry.config, {**preset_opts, **opts})
    if "seed" in m.defect or "seed" in shared_defect:
        raise NetmendError(f"{where}: the defect's seed is each cell's seed (give seeds = [...])")
    if defect_config is not None:
        _check_options(f"{where}.defect", defect_config, _options({**shared_defect, **m.defect}))
    if m.certify and defect_kinds != {"safety"}:
        raise NetmendError(f"{where}: certify proves safety properties; the grid's models have "
                           f"{', '.join(sorted(k for k in defect_kinds if k != 'safety'))} defects")
    out = {"label": label, "method": name, "localiser": m.localiser, "repairer": m.repairer,
           "locate": m.locate, "repair": m.repair, "max_accuracy_drop": m.max_accuracy_drop, "gate": m.gate}
    if m.certify:                        # only when asked: the recipes (and cell ids) of earlier grids stay the same
        out["certify"] = {"rounds": m.certify_rounds, "verify_timeout": m.verify_timeout}
    return out


def _options(defect: dict[str, Any]) -> dict[str, Any]:
    """A cell's defect options as its defect's config takes them: without `kind`, which picks the defect itself."""
    return {k: v for k, v in defect.items() if k != "kind"}


def _cell_kinds(grid: Grid, sources: list[tuple[str, str | None, dict[str, Any]]], path: Path) -> dict[str, set[str]]:
    """{method label: the defect kinds its cells repair}. A cell repairs the defect its model records, or the kind
    its defect options name (`kind`, as `netmend repair --defect`; the method's over the model entry's over the
    grid's): a clean model, which records none, needs one."""
    from ..registry import DEFECTS

    tables = [("defect", grid.defect), *((f"models {e.folder!r} defect", e.defect) for e in grid.models
                                         if isinstance(e, ModelFolder)),
              *((f"methods.{label}.defect", m.defect) for label, m in grid.methods.items())]
    for where, options in tables:
        if "kind" in options:
            kind = options["kind"]
            try:
                if not isinstance(kind, str):
                    raise NetmendError(f"kind names a defect (a string), got {kind!r}")
                DEFECTS.entry(kind)
            except NetmendError as exc:
                raise NetmendError(f"grid {path}: {where}: {exc}") from None
    kinds: dict[str, set[str]] = {}
    for label, m in grid.methods.items():
        kinds[label] = set()
        for where, recorded, own in sources:
            kind = {"kind": recorded, **grid.defect, **own, **m.defect}["kind"]
            if kind is None:
                raise NetmendError(f"grid {path}: {where} records no defect to repair: name the one its cells repair, "
                                   f"e.g. defect = {{ kind = \"adversarial\" }} (grid, models entry or method)")
            kinds[label].add(kind)
    return kinds


def _plan(grid: Grid, path: Path) -> Plan:
    from ..registry import ARCHITECTURES, DATASETS, DEFECTS, TRIGGERS

    import torch

    try:                                   # a name only: the cells may run on other machines (Ray), not here
        torch.device(grid.device)
    except (RuntimeError, ValueError):
        raise NetmendError(f"grid {path}: device: {grid.device!r} is not a torch device name") from None
    base = path.resolve().parent
    data_dir = str((base / grid.data_dir).resolve()) if grid.data_dir else None
    models: dict[str, dict[str, Any]] = {}
    per_model: list[tuple[str, dict[str, Any], int, dict[str, Any]]] = []   # (model key, coords without seed /
    # method, seed, the models entry's own defect options)
    sources: list[tuple[str, str | None, dict[str, Any]]] = []  # (where, the defect its model records, own options)
    if grid.models:
        from ..modelio import read_info

        for entry in grid.models:
            own_entry = isinstance(entry, ModelFolder)
            m = entry.folder if own_entry else entry
            seeds = entry.seeds if own_entry and entry.seeds is not None else grid.seeds
            folder = (base / m).resolve()
            try:
                info = read_info(folder) if not folder.is_file() else _network_info(folder)
            except NetmendError as exc:
                raise NetmendError(f"grid {path}: models: {exc}") from None
            kind = (info.get("defect") or {}).get("kind")
            recipe = {"folder": str(folder), "content": _folder_hash(folder)}
            key = sha256(recipe)
            models[key] = recipe
            own_defect = entry.defect if own_entry else {}
            coords = {"model": m, **({"defect": defect_label(own_defect)} if own_defect else {})}
            per_model += [(key, coords, s, own_defect) for s in seeds]
            sources.append((f"models: {m}", None if kind == "clean" else kind, own_defect))
    else:
        for kind, reg, names in (("datasets", DATASETS, grid.datasets), ("archs", ARCHITECTURES, grid.archs)):
            for n in names:
                try:
                    entry = reg.entry(n)
                except NetmendError as exc:
                    raise NetmendError(f"grid {path}: {kind}: {exc}") from None
                if kind == "datasets" and entry.extra.get("trainer"):
                    raise NetmendError(f"grid {path}: datasets: {n} is tabular; bench trains backdoored image "
                                       f"models — list trained {n} model folders under models instead")
        for name, a in grid.attacks.items():
            try:
                if a.defect in ("backdoor", "spurious"):        # the others carry no trigger
                    TRIGGERS.entry(a.kind or name)
            except NetmendError as exc:
                raise NetmendError(f"grid {path}: attacks.{name}: {exc}") from None
        sources += [(f"attacks.{name}", RECORDS[a.defect], {}) for name, a in grid.attacks.items()]
        train = grid.train.model_dump()
        for ds in grid.datasets:
            for arch in grid.archs:
                for aname, a in grid.attacks.items():
                    for seed in grid.seeds:
                        recipe = {"train": _train_recipe(ds, arch, aname, a, train, seed, grid.device)}
                        key = sha256(recipe)
                        models[key] = recipe
                        per_model.append((key, {"dataset": ds, "arch": arch, "attack": aname}, seed, {}))
    kinds = _cell_kinds(grid, sources, path)
    configs = {label: {DEFECTS.entry(k).config for k in ks} for label, ks in kinds.items()}
    config = {label: cs.pop() if len(cs) == 1 else None for label, cs in configs.items()}
    try:
        methods = {label: _check_method(label, m, kinds[label], config[label], grid.defect)
                   for label, m in grid.methods.items()}
    except NetmendError as exc:
        raise NetmendError(f"grid {path}: {exc}") from None
    own_defects = [(e.folder, e.defect) for e in grid.models if isinstance(e, ModelFolder) and e.defect]
    for folder, own_defect in own_defects:      # checked like the grid's, once each
        for label, m in grid.methods.items():
            if config[label] is None:
                continue
            try:
                _check_options(f"models {folder!r} defect", config[label],
                               _options({**grid.defect, **own_defect, **m.defect}))
            except NetmendError as exc:
                raise NetmendError(f"grid {path}: {exc}") from None
    cells = []
    for label, mrec in methods.items():
        for key, coords, seed, own_defect in per_model:
            defect = {**grid.defect, **own_defect, **grid.methods[label].defect}
            recipe = {"model": key, "method": mrec, "defect": defect, "seed": seed, "device": grid.device}
            h = sha256(recipe)[:10]
            name = "-".join(_slug(str(v)) for v in (*coords.values(), label)) + f"-s{seed}-{h}"
            cells.append(Cell(name, {**coords, "method": label, "seed": seed}, key, mrec, defect, seed, grid.device,
                              data_dir))
    # the table's order: model coordinates, then method, then seed — the same whichever way the grid ran
    order = {k: i for i, k in enumerate(dict.fromkeys(tuple(c.items()) for _, c, _, _ in per_model))}
    labels = list(methods)
    cells.sort(key=lambda c: (order[tuple((k, v) for k, v in c.coords.items() if k not in ("method", "seed"))],
                              labels.index(c.coords["method"]), c.seed))
    dump = grid.model_dump()
    seeds_of: dict[tuple, list[int]] = {}
    for k, _, s, own_defect in per_model:
        seeds_of.setdefault((k, canonical(own_defect)), []).append(s)
    own = any(isinstance(m, ModelFolder) for m in grid.models)       # a grid written before own seeds hashes as then
    dump["models"] = [f"{models[k]['folder']}#{models[k]['content']}" + (f"@{seeds_of[k, d]}" if own else "")
                      + (f"%{d}" if d != "{}" else "") for k, d in seeds_of] if grid.models else []
    for a in dump["attacks"].values():     # fields a backdoor leaves at their defaults: out of the hash, as before
        if a["defect"] == "backdoor":      # they existed (an earlier grid's output folder still resumes)
            for k in NOT_BACKDOOR:
                a.pop(k)
        for k in MISLABELLED:              # and those only a mislabelled attack sets, out of every other's
            if k in a and a[k] is None:
                a.pop(k)
    for mdump in dump["methods"].values():        # certify's fields, unless asked for: out of the hash, as before they
        if not mdump["certify"]:                  # existed (an earlier grid's output folder still resumes)
            for k in ("certify", "certify_rounds", "verify_timeout"):
                mdump.pop(k)
    from ..train import without_recipe_defaults

    dump["train"] = without_recipe_defaults(dump["train"])     # the field recipe's options at their defaults: out of
                                                               # the hash, as before they existed
    dump["data_dir"] = None                           # where the data lies is not what the grid computes
    return Plan(grid, path, sha256(dump), models, cells)


def _train_recipe(ds: str, arch: str, name: str, a: Attack, train: dict[str, Any], seed: int,
                  device: str) -> dict[str, Any]:
    """The training recipe a model's cache key is the hash of: nothing about where it runs."""
    from ..data.triggers import TriggerSpec
    from ..train import default_epochs, without_recipe_defaults

    spec = TriggerSpec(kind=a.kind or name, size=a.size, position=a.position, margin=a.margin, pattern=a.pattern,
                       alpha=a.alpha, seed=seed if a.pattern_seed is None else a.pattern_seed, params=dict(a.params))
    cfg = {k: v for k, v in without_recipe_defaults(train).items() if k != "pool_fraction"}
    cfg["epochs"] = cfg["epochs"] or default_epochs(arch, ds)
    common = {"train": {**cfg, "seed": seed}, "pool_fraction": train["pool_fraction"], "device": device}
    if a.defect == "spurious":
        return {"defect": "spurious", "dataset": ds, "arch": arch, "trigger": spec.to_json(),
                "cue_class": 0 if a.cue_class is None else a.cue_class, "fraction": a.fraction or 0.5, **common}
    if a.defect == "leakage":
        return {"defect": "leakage", "dataset": ds, "arch": arch, "null": a.null or "square",
                "layout_seed": a.layout_seed or 0, **common}
    if a.defect == "clean":
        return {"defect": "clean", "dataset": ds, "arch": arch, **common}
    if a.defect == "mislabelled":
        return {"defect": "mislabelled", "dataset": ds, "arch": arch, "source_class": a.source_class,
                "as_class": a.as_class, "fraction": 0.4 if a.fraction is None else a.fraction, **common}
    # a backdoor's recipe has no "defect" key: the hashes of the models grids trained before stay the same
    return {"dataset": ds, "arch": arch, "trigger": spec.to_json(), "target": a.target, "poison_rate": a.poison_rate,
            **common}


def _network_info(path: Path) -> dict[str, Any]:
    """The info of a network file netmend loads directly (e.g. an ACAS Xu .nnet / .onnx)."""
    from ..modelio import load_any_model

    return load_any_model(path)[1]


def defect_label(options: dict[str, Any]) -> str:
    """A models entry's own defect options as its cells' `defect` coordinate (a table column): `property=prop_2`."""
    return " ".join(f"{k}={v}" for k, v in sorted(options.items()))


def _folder_hash(folder: Path) -> str:
    """A model folder's content hash (its files, by name), so an edited model is not mistaken for the old one; a
    network file's, of its bytes."""
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(q for q in folder.rglob("*") if q.is_file())
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
