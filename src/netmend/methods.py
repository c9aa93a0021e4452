"""Method presets: names for a (localiser, repairer, options) triple. Users may also name the halves.

Add a preset with `METHODS.add(name, MethodPreset(...), description)` in the module that
implements it (any module in netmend.repair, .locate, .defects, .data or .zoo is imported on first use).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .registry import METHODS


@dataclass(frozen=True)
class MethodPreset:
    localiser: str | None
    repairer: str
    locate_options: dict[str, Any] = field(default_factory=dict)
    repair_options: dict[str, Any] = field(default_factory=dict)
    uses_pairs: bool = True        # does the method read the evidence pairs?
    paper: str = ""
    defects: tuple[str, ...] | None = None   # the defect kinds it applies to (None: any)

    def applies_to(self, kind: str) -> bool:
        return self.defects is None or kind in self.defects


METHODS.add("finetune", MethodPreset(None, "finetune", paper="baseline"),
            "fine-tune all weights on the clean repair data and cleansed pairs")
METHODS.add("fine-pruning", MethodPreset("dormant", "prune", paper="Liu et al., RAID 2018"),
            "prune units dormant on clean data, then fine-tune (fine-pruning baseline)")
