"""model.json checked at the edge: a pydantic schema of what netmend reads from a model (or run) folder.

Every field netmend uses is typed and bounded here, so a hand-edited or corrupted model.json is a one-line
error naming the field (`model.json: arch_args.num_classes: …`) before anything is built — absurd sizes never
reach the allocator. Fields netmend does not read are kept as they are (extra keys are allowed), so every
folder netmend has written still loads.

Stated limits (LIMITS): classes, input values, layer widths and the parameter count of the model built from
the file (counted on the meta device, which allocates nothing).
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from .errors import NetmendError

MAX_CLASSES = 100_000              # num_classes
MAX_INPUT_VALUES = 50_000_000      # product of in_shape (3×4096×4096 is 50.3 M)
MAX_INPUT_DIMS = 4                 # in_shape has 1 (features) to 4 entries
MAX_WIDTH = 65_536                 # any hidden size, channel count, width or trigger size
MAX_LAYERS = 1_000                 # entries of a hidden-size list
MAX_PARAMETERS = 500_000_000       # parameters + buffers of the model built from model.json (2 GB as float32)
LIMITS = {"num_classes": MAX_CLASSES, "in_shape values": MAX_INPUT_VALUES, "in_shape entries": MAX_INPUT_DIMS,
          "layer width": MAX_WIDTH, "hidden layers": MAX_LAYERS, "parameters": MAX_PARAMETERS}

# defect kinds whose data netmend loads itself (model.json must then name the dataset and its split seed)
DATASET_KINDS = {"clean", "backdoor", "spurious", "leakage", "fairness", "adversarial", "wrong-predictions"}

StrictInt = Annotated[int, Strict()]
Width = Annotated[int, Strict(), Field(ge=1, le=MAX_WIDTH)]
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=200)]


def _widths(value: Any, what: str) -> Any:
    """A width or a list of widths (hidden sizes), whole numbers in 1..MAX_WIDTH."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) > MAX_LAYERS:
        raise ValueError(f"{len(value)} {what} entries; at most {MAX_LAYERS}")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{what} must be whole numbers (or a list of them), got {v!r:.40}")
        if not 1 <= v <= MAX_WIDTH:
            raise ValueError(f"{what} must lie in 1..{MAX_WIDTH}, got {v}")
    return value


class _Open(BaseModel):
    """Unknown keys are kept (a plugin's architecture or a newer netmend may write more)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ArchArgs(_Open):
    in_shape: list[Annotated[int, Strict(), Field(ge=1, le=MAX_INPUT_VALUES)]] = Field(min_length=1,
                                                                                         max_length=MAX_INPUT_DIMS)
    num_classes: Annotated[int, Strict(), Field(ge=1, le=MAX_CLASSES)]
    mean: Optional[list[Finite]] = Field(None, max_length=MAX_WIDTH)
    std: Optional[list[Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]]] = Field(None, max_length=MAX_WIDTH)
    hidden: Optional[Any] = None
    channels: Optional[list[Width]] = Field(None, max_length=MAX_LAYERS)
    width: Optional[Width] = None
    input_min: Optional[list[Finite]] = None
    input_max: Optional[list[Finite]] = None
    input_mean: Optional[list[Finite]] = None
    input_range: Optional[list[Finite]] = None
    output_mean: Optional[list[Finite]] = None
    output_range: Optional[list[Finite]] = None

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v):
        return v if v is None else _widths(v, "hidden sizes")

    @model_validator(mode="after")
    def _size(self):
        n = math.prod(self.in_shape)
        if n > MAX_INPUT_VALUES:
            raise ValueError(f"in_shape {self.in_shape} holds {n:,} values per sample; netmend's limit is "
                             f"{MAX_INPUT_VALUES:,}")
        return self


class Trigger(BaseModel):
    """A TriggerSpec as saved (every key known: an unknown one would not rebuild the trigger)."""

    model_config = ConfigDict(extra="forbid")
    kind: Name
    size: Width = 3
    position: Name = "br"
    margin: Annotated[int, Strict(), Field(ge=0, le=MAX_WIDTH)] = 0
    pattern: Name = "white"
    alpha: Finite = 0.2
    seed: StrictInt = 0
    params: dict[str, Any] = Field(default_factory=dict)


class Defect(_Open):
    kind: Optional[Name] = None
    target: Optional[Annotated[int, Strict(), Field(ge=0, le=MAX_CLASSES)]] = None
    trigger: Optional[Trigger] = None
    pattern: Optional[Trigger] = None
    class_: Optional[Annotated[int, Strict(), Field(ge=0, le=MAX_CLASSES)]] = Field(None, alias="class")
    protected: Optional[list[Name] | Name] = None
    property: Optional[Name] = None
    pair_candidates: Optional[list[Annotated[int, Strict(), Field(ge=0)]]] = None

    def require_fields(self, kind: str | None) -> None:
        """The fields a defect of `kind` is rebuilt from."""
        need = {"backdoor": ("trigger", "target"), "spurious": ("pattern", "class_")}.get(kind or "", ())
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            name = missing[0].rstrip("_")
            raise ValueError(f"a {kind} defect needs its {name} (defect.{name} is missing)")


class ModelInfo(_Open):
    arch: Optional[Name] = None
    arch_args: Optional[ArchArgs] = None
    model_form: Optional[Name] = None
    model_file: Optional[Name] = None
    dataset: Optional[Name] = None
    data_dir: Optional[Annotated[str, Strict()]] = None
    split_seed: Optional[StrictInt] = None
    pool_fraction: Optional[Annotated[float, Strict(), Field(gt=0, lt=1)]] = None
    test_fraction: Optional[Annotated[float, Strict(), Field(gt=0, lt=1)]] = None
    classes: Optional[list[Any]] = Field(None, max_length=MAX_CLASSES)
    defect: Defect = Field(default_factory=Defect)
    user_data: Optional[dict[str, Any]] = None
    source: Optional[Annotated[str, Strict()]] = None
    training: Optional[dict[str, Any]] = None
    metrics: Optional[dict[str, Any]] = None

    @field_validator("model_file")
    @classmethod
    def _plain_name(cls, v):
        if v is not None and (v in (".", "..") or "/" in v or "\\" in v):
            raise ValueError(f"must be a file name inside the run folder, got {v!r:.60}")
        return v

    @model_validator(mode="after")
    def _whole(self):
        if self.arch is None and self.model_form is None:
            raise ValueError("names no arch (nor model_form): it does not describe a model")
        if self.arch is not None and self.model_form is None and self.arch_args is None:
            raise ValueError("arch_args (in_shape, num_classes) is missing")
        kind = self.defect.kind
        if self.model_form is None and self.user_data is None:   # netmend rebuilds the defect from its own data
            if kind in DATASET_KINDS:
                for name in ("dataset", "split_seed"):
                    if getattr(self, name) is None:
                        raise ValueError(f"{name} is missing (a {kind} model is measured on the data set it names)")
            self.defect.require_fields(kind)
        if self.defect.target is not None and self.arch_args is not None and \
                self.defect.target >= self.arch_args.num_classes:
            raise ValueError(f"defect.target {self.defect.target} is outside the model's "
                             f"{self.arch_args.num_classes} classes")
        return self


def one_line(exc: ValidationError, where: str) -> str:
    """pydantic's ValidationError as one line: the first problem's field path, message and value."""
    errors = exc.errors(include_url=False)
    e = errors[0]
    path = ".".join("class" if p == "class_" else str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if e["type"] in ("missing", "value_error") or isinstance(got, dict) else f" (got {got!r:.60})"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    text = f"{where}: {path + ': ' if path else ''}{msg}{shown}{more}"
    return " ".join(text.split())


def validate_model_info(info: Any, where: str = "model.json") -> ModelInfo:
    """Check a model.json's content; a problem is a NetmendError naming the field. Returns the parsed schema
    (callers keep using the plain dict, so nothing netmend writes is reinterpreted)."""
    if not isinstance(info, dict):
        raise NetmendError(f"{where}: expected a JSON object, got {type(info).__name__}")
    try:
        return ModelInfo.model_validate(info)
    except ValidationError as exc:
        raise NetmendError(one_line(exc, where)) from None


class _Arch(_Open):
    arch: Name
    arch_args: ArchArgs


def validate_arch(info: Any, where: str = "model.json") -> None:
    """Only what builds the network: arch and arch_args."""
    try:
        _Arch.model_validate(info if isinstance(info, dict) else {})
    except ValidationError as exc:
        raise NetmendError(one_line(exc, where)) from None


def check_defect_fields(info: dict[str, Any], kind: str | None, where: str = "model.json") -> None:
    """The fields a defect of `kind` (the recorded one or --defect) needs from model.json."""
    try:
        Defect.model_validate(info.get("defect") or {}).require_fields(kind)
    except (ValidationError, ValueError) as exc:
        raise NetmendError(one_line(exc, where) if isinstance(exc, ValidationError) else f"{where}: {exc}") from None


def check_parameter_count(n: int, where: str = "model.json") -> None:
    if n > MAX_PARAMETERS:
        raise NetmendError(f"{where}: the model it describes has {n:,} parameters; netmend's limit is "
                           f"{MAX_PARAMETERS:,}")
