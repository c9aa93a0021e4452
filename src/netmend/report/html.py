"""Self-contained HTML reports: one per run folder, and one comparing runs (the demo's, `netmend report RUN...`).

No network and no other file: pictures are matplotlib figures (Agg) inlined as base64 PNG, the style sheet is
inline, there is no script. Sections, top to bottom, each with a stable id:

  verdict       defect, method, accepted or rejected by the acceptance gate, the defect's own metric and accuracy
                before → after (the change coloured by better / worse for that metric), time, samples used
  evidence      image defects: the evidence inputs (corrupted, cleansed, the stamp transplanted onto test images)
                with the decisions before and after; fairness: rates per protected group; safety: 2-D slices of the
                property box coloured by advisory, counterexamples marked (from the run's evidence.npz)
  where         the localiser's ranking (sites.json) and the parameters edited: ‖ΔW‖/‖W‖, weights changed
  side-effects  per-class accuracy before / after, every other metric the defect reports (R-Acc, Clean / Spur.)
  reproduce     the command, seed, versions, machine and links to the run's files

Everything is read from the run folder (metrics.json, sites.json, config.json, model.json, evidence.npz,
edit.safetensors), so a report can be rendered again at any time from the folder alone.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import charts

# ----------------------------------------------------------------------------- what each metric means

UP, DOWN, ZERO = "up", "down", "zero"      # higher is better, lower is better, closer to 0 is better

# key: (label, direction or None when neither way is better, unit)
#   unit "%": a share, shown ×100 with "%"; "pt": a difference of shares, shown ×100 in points; "count"; "s"
METRICS: dict[str, tuple[str, str | None, str]] = {
    "clean_accuracy": ("clean accuracy", UP, "%"),
    "overall_accuracy": ("overall accuracy", UP, "%"),
    "asr": ("attack success rate (ASR)", DOWN, "%"),
    "asr_transplant": ("ASR, the pairs' stamp on clean test images", DOWN, "%"),
    "robust_accuracy": ("R-Acc: triggered inputs given their true class", UP, "%"),
    "robust_accuracy_transplant": ("R-Acc, the pairs' stamp on clean test images", UP, "%"),
    "asr_clean": ("target-class rate without the trigger (ordinary confusion)", DOWN, "%"),
    "class_fairness_gap": ("class fairness gap (mean − worst per-class accuracy)", DOWN, "pt"),
    "discrimination_rate": ("discrimination rate (test rows)", DOWN, "%"),
    "discrimination_rate_uniform": ("discrimination rate (uniform samples of the domain)", DOWN, "%"),
    "discrimination_rate_evidence": ("discrimination rate (evidence rows)", DOWN, "%"),
    "demographic_parity_difference": ("demographic parity difference", DOWN, "pt"),
    "equalized_odds_difference": ("equalized odds difference", DOWN, "pt"),
    "leakage": ("leakage: share of |IG| on the null block", DOWN, "%"),
    "net_leakage": ("net leakage: |signed IG on the null block| / |signed IG|", DOWN, "%"),
    "blank_null_accuracy": ("accuracy with the null block blanked", UP, "%"),
    "clean": ("Clean: the class's accuracy on its own images", UP, "%"),
    "with_pattern": ("the class's accuracy with the pattern stamped", None, "%"),
    "spur": ("Spur.: accuracy with the pattern − Clean", ZERO, "pt"),
    "pattern_pull_rate": ("pattern pull: other classes' stamped images sent to the class", DOWN, "%"),
    "evidence_fixed": ("evidence inputs now given their right label", UP, "%"),
    "heldout_fixed": ("held-out mistakes now right", UP, "%"),
    "violation_rate": ("violation rate (uniform samples of the box)", DOWN, "%"),
    "heldout_violation_rate": ("held-out counterexamples still violating", DOWN, "%"),
    "counterexamples_found": ("falsifier starts that found a counterexample", DOWN, "count"),
    "fidelity": ("fidelity: the original advisory kept", UP, "%"),
    "violation_samples": ("box samples for the violation rate", None, "count"),
    "falsifier_starts": ("falsifier starts", None, "count"),
    "heldout_counterexamples": ("held-out counterexamples", None, "count"),
    "fidelity_samples": ("samples for fidelity", None, "count"),
    "leakage_seconds": ("time to measure leakage", None, "s"),
    "n_test": ("test samples", None, "count"),
}

# the defect's own metric and the accuracy it is traded against, per defect kind
PRIMARY = {"backdoor": "asr", "adversarial": "asr", "spurious": "pattern_pull_rate", "leakage": "leakage",
           "fairness": "discrimination_rate", "safety": "violation_rate", "wrong-predictions": "heldout_fixed"}
SECONDARY = {"backdoor": ["robust_accuracy"], "adversarial": ["robust_accuracy"], "spurious": ["spur"],
             "leakage": ["blank_null_accuracy"], "fairness": ["demographic_parity_difference"],
             "safety": ["counterexamples_found", "heldout_violation_rate"], "wrong-predictions": ["evidence_fixed"]}
ACCURACY = ("clean_accuracy", "fidelity", "overall_accuracy")
MAX_EDIT_LINES = 4         # edited parameters listed per run in a comparison (the largest first)
MAX_PARAM_COLUMNS = 16     # parameters drawn in a comparison's edit map
MAX_GROUPS = 12            # protected groups drawn (the table lists every one)


def metric_info(key: str) -> tuple[str, str | None, str]:
    if key in METRICS:
        return METRICS[key]
    if key.startswith("n_"):
        return (key[2:].replace("_", " ") + " (count)", None, "count")
    return (key.replace("_", " "), None, "")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def fmt_value(key: str, v: Any) -> str:
    if not _num(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else html.escape(str(v))
    unit = metric_info(key)[2]
    if unit == "%":
        p = 100 * v
        return f"{p:.3g} %" if 0 < abs(p) < 0.01 else f"{p:.2f} %"
    if unit == "pt":
        return f"{100 * v:.2f} pt"
    if unit == "count":
        return f"{int(v):,}".replace(",", " ") if float(v).is_integer() else f"{v:g}"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:.4g}"


def change(key: str, b: Any, a: Any) -> tuple[str, str]:
    """(the change as text with its unit, 'better' | 'worse' | 'same' | 'neutral')."""
    if not (_num(b) and _num(a)):
        return "", "neutral"
    label, direction, unit = metric_info(key)
    d = a - b
    if unit in ("%", "pt"):
        text = f"{100 * d:+.2f} pt"
        tiny = abs(100 * d) < 0.005
    elif unit == "count":
        text, tiny = f"{d:+g}", d == 0
    elif unit == "s":
        text, tiny = f"{d:+.2f} s", abs(d) < 0.005
    else:
        text, tiny = f"{d:+.4g}", d == 0
    text = text.replace("-", "−")
    if tiny:
        return ("no change", "same")
    if direction is None:
        return (text, "neutral")
    if direction == ZERO:
        better = abs(a) < abs(b)
        same = abs(a) == abs(b)
        return (text, "same" if same else "better" if better else "worse")
    return (text, "better" if (d > 0) == (direction == UP) else "worse")


# ----------------------------------------------------------------------------- a run, read from its folder

@dataclass
class Run:
    name: str
    metrics: dict[str, Any]                      # metrics.json (or a RepairResult.summary())
    sites: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)
    edits_are_candidate: bool = False

    @property
    def accepted(self) -> bool:
        return self.metrics.get("accepted") is not False

    @property
    def after(self) -> dict[str, Any]:
        """What the method did: the result, or a rejected candidate's metrics (the model itself came back unchanged)."""
        if not self.accepted and self.metrics.get("candidate_after"):
            return self.metrics["candidate_after"]
        return self.metrics.get("after") or {}

    @property
    def before(self) -> dict[str, Any]:
        return self.metrics.get("before") or {}

    @property
    def after_label(self) -> str:
        return "after" if self.accepted else "candidate (rejected)"

    @property
    def kind(self) -> str:
        return ((self.config.get("defect") or {}).get("kind") or (self.info.get("defect") or {}).get("kind") or "")

    @property
    def primary(self) -> str | None:
        key = PRIMARY.get(self.kind)
        if key and key in self.before:
            return key
        return next((k for k in self.before if k in PRIMARY.values()), None)

    @property
    def accuracy_key(self) -> str | None:
        return next((k for k in ACCURACY if k in self.before), None)

    @property
    def changed_weights(self) -> int | None:
        if self.metrics.get("structure"):          # a structural edit: parameters added, none changed
            return int(self.metrics["structure"].get("added_parameters", 0))
        if "changed_weights" in self.metrics:
            return int(self.metrics["changed_weights"])
        norms = self.metrics.get("edit_norms")
        return None if norms is None else int(sum(v.get("changed", 0) for v in norms.values()))

    @property
    def note(self) -> str:
        m = self.metrics
        if m.get("note"):
            return m["note"]
        if not self.accepted and m.get("gate"):
            return f"repair rejected: {m['gate'].get('reason', '')}"
        if self.changed_weights == 0 and self.folder is not None:
            return "the repair changed no weight: the model is as it was"
        return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 1 << 26:
                return {}
            return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
    except (OSError, ValueError):
        return {}


def _edit_rows(folder: Path, metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """One row per edited parameter: shape, size, weights changed, ‖ΔW‖_F, ‖ΔW‖/‖W‖. A rejected run's candidate
    edit is read from candidate-edit.safetensors (its ‖W‖ from the run's model, which is the input model)."""
    norms = metrics.get("edit_norms") or {}
    path, candidate = folder / "edit.safetensors", False
    if not norms and (folder / "candidate-edit.safetensors").is_file():
        path, candidate = folder / "candidate-edit.safetensors", True
        norms = _norms_from_file(path, folder / "model.safetensors")
    header = _safetensors_header(path)
    rows = []
    for name, n in norms.items():
        shape = header.get(name, {}).get("shape")
        size = int(np.prod(shape)) if shape else None
        rows.append({"name": name, "shape": shape, "size": size, "changed": n.get("changed"), "fro": n.get("fro"),
                     "relative": n.get("relative")})
    rows.sort(key=lambda r: -(r["relative"] if _num(r["relative"]) else r["fro"] or 0))
    return rows, candidate


def _norms_from_file(edit_path: Path, model_path: Path) -> dict[str, dict[str, float]]:
    """`Edit.norms` of a run folder's edit against its model's weights (no relative norm where ‖W‖ is zero)."""
    from safetensors import safe_open

    from ..edit import Edit

    try:
        edit = Edit.load(edit_path)
        weights = {}
        if model_path.is_file():
            with safe_open(str(model_path), "pt") as f:
                weights = {k: f.get_tensor(k) for k in f.keys() if k in edit.deltas}
    except Exception:            # noqa: BLE001 - an unreadable file: the report says the edit is not available
        return {}
    norms = edit.norms(weights)
    for n in norms.values():
        if not math.isfinite(n.get("relative", 0.0)):
            n.pop("relative")
    return norms


def load_run(folder: str | Path) -> Run:
    """A run folder's record (missing files give empty parts: the report says what it cannot show)."""
    from .evidence import load as load_evidence

    folder = Path(folder)
    metrics = _read_json(folder / "metrics.json")
    edits, cand = _edit_rows(folder, metrics)
    return Run(name=str(metrics.get("method") or folder.name), metrics=metrics, sites=_read_json(folder / "sites.json"),
               config=_read_json(folder / "config.json"), info=_read_json(folder / "model.json"),
               evidence=load_evidence(folder / "evidence.npz"), folder=folder, edits=edits, edits_are_candidate=cand)


def run_from_summary(summary: dict[str, Any], info: dict[str, Any] | None = None) -> Run:
    """A run known only by its summary (RepairResult.summary()): no evidence, no sites, no files."""
    edits = [{"name": p, "shape": None, "size": None, "changed": None, "fro": None, "relative": None}
             for p in summary.get("edited_parameters", [])]
    info = dict(info or {})
    return Run(name=str(summary.get("method", "")), metrics=summary, info=info, edits=edits)


# ----------------------------------------------------------------------------- page pieces

CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#202124;background:#f8f9fa}
main{max-width:1200px;margin:0 auto;padding:8px 24px 48px}
header{padding:20px 0 4px}
h1{font-size:26px;margin:0 0 4px;overflow-wrap:anywhere}
h2{font-size:19px;margin:0 0 10px;padding-bottom:4px;border-bottom:1px solid #dadce0}
h3{font-size:16px;margin:18px 0 6px}
nav{font-size:14px;color:#5f6368;margin:6px 0 12px}
nav a{margin-right:14px}
section{background:#fff;border:1px solid #dadce0;border-radius:8px;padding:16px 20px;margin:14px 0}
.sub{color:#5f6368;margin:2px 0 8px}
.banner{border-radius:6px;padding:10px 14px;font-size:17px;font-weight:600;margin:4px 0 12px}
.banner.accepted{background:#e6f4ea;color:#137333;border:1px solid #a8dab5}
.banner.rejected{background:#fce8e6;color:#a50e0e;border:1px solid #f6aea9}
.banner.unchanged,.banner.unchecked{background:#fef7e0;color:#8a5700;border:1px solid #fdd663}
.banner small{font-weight:400;font-size:14px;display:block;color:#3c4043}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
.card{flex:1 1 170px;max-width:100%;border:1px solid #dadce0;border-radius:6px;padding:10px 12px;background:#fff}
.card .k{font-size:13px;color:#5f6368}
.card .v{font-size:18px;font-weight:600}
.nw,td.m{white-space:nowrap}
.card .d{font-size:14px}
.better{color:#137333}.worse{color:#c5221f}.same,.neutral{color:#5f6368}
td.better,td.worse{font-weight:600}
.tag{display:inline-block;padding:0 7px;border-radius:10px;font-size:13px;font-weight:600}
.tag.accepted{background:#e6f4ea;color:#137333}.tag.rejected{background:#fce8e6;color:#a50e0e}
.tag.unchanged,.tag.unchecked{background:#fef7e0;color:#8a5700}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:14px}
th,td{border-bottom:1px solid #e8eaed;padding:5px 8px;text-align:right;vertical-align:top;overflow-wrap:break-word}
td code{overflow-wrap:anywhere}
th{background:#f1f3f4;font-weight:600}
th:first-child,td:first-child,td.l,th.l{text-align:left}
td.num{white-space:nowrap}
img{max-width:100%;height:auto;display:block;margin:6px 0}
pre,code{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
pre{background:#f1f3f4;border-radius:6px;padding:8px 10px;white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0 10px}
ul{margin:4px 0 8px;padding-left:22px}
.note{background:#f1f3f4;border-left:4px solid #9aa0a6;padding:6px 10px;margin:8px 0;color:#3c4043}
.note.bad{border-left-color:#d93025}
.files>span{margin-right:16px;display:inline-block}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:6px 0}
dt{color:#5f6368}dd{margin:0;overflow-wrap:anywhere}
footer{color:#5f6368;font-size:13px;margin-top:12px}
"""

SECTIONS = [("verdict", "Verdict"), ("evidence", "Evidence"), ("where", "Where the repair acted"),
            ("side-effects", "Side effects"), ("reproduce", "Reproduce")]


def _e(s: Any) -> str:
    return html.escape(str(s))


def _page(title: str, subtitle: str, body: str) -> str:
    from .. import __version__

    nav = "".join(f'<a href="#{i}">{_e(t)}</a>' for i, t in SECTIONS)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>{_e(title)}</h1><p class=\"sub\">{subtitle}</p><nav>{nav}</nav></header>"
            f"{body}<footer>netmend {_e(__version__)} · a self-contained page: no script, no network, "
            f"pictures embedded</footer></main></body></html>\n")


def _section(sid: str, inner: str, heading: str | None = None) -> str:
    title = heading or dict(SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{inner}</section>'


def _status(run: Run) -> tuple[str, str]:
    """(css class, short word): accepted | rejected | unchanged (accepted, but no weight changed)."""
    if not run.accepted:
        return "rejected", "rejected"
    if run.changed_weights == 0:
        return "unchanged", "unchanged"
    if run.folder is not None and "gate" in run.metrics and not run.metrics["gate"]:
        return "unchecked", "not checked"         # --no-gate
    return "accepted", "accepted"


def _defect_text(run: Run) -> str:
    d = {**(run.info.get("defect") or {}), **(run.config.get("defect") or {})}
    kind = run.kind or "unknown defect"
    parts = [f"<b>{_e(kind)}</b>"]
    ds = d.get("dataset") or run.info.get("dataset")
    arch = run.info.get("arch")
    if ds or arch:
        parts.append(" on ".join(_e(x) for x in (arch, ds) if x))
    trig = d.get("trigger") or d.get("pattern")
    if isinstance(trig, dict):
        t = f"{trig.get('kind', '')} trigger"
        if trig.get("size"):
            t += f" {trig['size']}×{trig['size']} at {trig.get('position', '')}"
        parts.append(_e(t))
    if d.get("target") is not None:
        parts.append(f"target class {_e(d['target'])}")
    if d.get("class") is not None or d.get("spurious_class") is not None:
        parts.append(f"class {_e(d.get('spurious_class', d.get('class')))}")
    if d.get("protected"):
        prot = d["protected"]
        parts.append("protected: " + _e(", ".join(prot) if isinstance(prot, list) else prot))
    prop = d.get("property")
    if prop:
        parts.append("property " + _e(prop.get("name") if isinstance(prop, dict) else prop))
    if d.get("pairs") is not None:
        parts.append(f"{_e(d['pairs'])} evidence pair{'s' if d['pairs'] != 1 else ''}")
    return " · ".join(parts)


def _method_text(run: Run) -> str:
    c = run.config
    loc, rep = c.get("localiser"), c.get("repairer")
    halves = " + ".join(x for x in (f"localiser {loc}" if loc else "", f"repairer {rep}" if rep else "") if x)
    return f"<b>{_e(run.name)}</b>" + (f" ({_e(halves)})" if halves else "")


def _card(key: str, b: Any, a: Any, after_label: str) -> str:
    label, direction, _ = metric_info(key)
    text, cls = change(key, b, a)
    hint = {UP: "higher is better", DOWN: "lower is better", ZERO: "closer to 0 is better"}.get(direction or "", "")
    return (f'<div class="card"><div class="k">{_e(label)}{" · " + hint if hint else ""}</div>'
            f'<div class="v"><span class="nw">{fmt_value(key, b)}</span> → <span class="nw">{fmt_value(key, a)}</span></div>'
            f'<div class="d {cls}">{_e(text)}{" (" + cls + ")" if cls in ("better", "worse") else ""}'
            f'{" · " + _e(after_label) if after_label != "after" else ""}</div></div>')


def _plain_card(label: str, value: str, detail: str = "") -> str:
    return (f'<div class="card"><div class="k">{_e(label)}</div><div class="v">{_e(value)}</div>'
            f'<div class="d neutral">{_e(detail)}</div></div>')


def _secs(v: Any) -> str:
    return f"{v:.2f} s" if _num(v) else "—"


# ----------------------------------------------------------------------------- single run

def _verdict(run: Run) -> str:
    cls, word = _status(run)
    gate = run.metrics.get("gate") or {}
    if cls == "rejected":
        kept = "kept, marked as rejected" in run.note
        head = ("Rejected by the acceptance gate"
                f"<small>{_e(gate.get('reason', ''))}. "
                + ("The candidate is kept in this folder, marked as rejected." if kept else
                   "The run folder holds the input model unchanged; the numbers below are the candidate's.")
                + "</small>")
    elif cls == "unchanged":
        head = f"Accepted, but nothing changed<small>{_e(run.note)}</small>"
    else:
        head = ("Accepted by the acceptance gate<small>the defect did not get worse and accuracy stayed within the "
                "budget on held-apart repair data</small>" if gate else
                "Repaired, not checked<small>no acceptance gate was run (--no-gate): nothing checked this candidate on "
                "held-apart repair data</small>")
    out = [f'<div class="banner {cls}">{head}</div>',
           f'<p>defect: {_defect_text(run)}<br>method: {_method_text(run)}</p>', '<div class="cards">']
    keys = [k for k in [run.primary, run.accuracy_key] + SECONDARY.get(run.kind, []) if k and k in run.before]
    for k in dict.fromkeys(keys):
        out.append(_card(k, run.before.get(k), run.after.get(k), run.after_label))
    m = run.metrics
    split = ""
    if _num(m.get("locate_seconds")) and _num(m.get("repair_seconds")):
        split = f"locate {m['locate_seconds']:.2f} s + repair {m['repair_seconds']:.2f} s"
    out.append(_plain_card("time (localise + repair)", _secs(m.get("seconds")), split))
    n = m.get("samples_used")
    out.append(_plain_card("samples used", f"{n:,}".replace(",", " ") if isinstance(n, int) else "—",
                           "repair data + evidence the method saw"))
    out.append("</div>")
    if gate.get("checks"):
        budget = gate.get("max_accuracy_drop")
        out.append("<h3>Acceptance gate</h3><p class=\"sub\">measured on held-apart repair data the method did not fit"
                   + (f"; accuracy budget {100 * budget:.2f} points" if _num(budget) else "") + "</p><ul>"
                   + "".join(f"<li>{_e(c)}</li>" for c in gate["checks"]) + "</ul>")
    if run.note and cls == "accepted":
        out.append(f'<p class="note{" bad" if cls == "rejected" else ""}">{_e(run.note)}</p>')
    return _section("verdict", "".join(out))


def _class_name(classes: Sequence[str], k: int) -> str:
    if 0 <= k < len(classes) and str(classes[k]) != str(k):
        return f"{k} {classes[k]}"
    return str(k)


def _image_evidence(ev: dict[str, Any], after_label: str) -> str:
    meta = ev["meta"]
    classes, target = meta.get("classes") or [], meta.get("target")
    labels, pb, pa = ev["labels"], ev["pred_before"], ev["pred_after"]
    titles, colors = [], []
    for i, role in enumerate(meta["roles"]):
        ok_b, ok_a = pb[i] == labels[i], pa[i] == labels[i]
        short = "cand." if "rejected" in after_label else "after"
        titles.append(f"{role.replace('evidence: ', '')}\ntrue {_class_name(classes, int(labels[i]))}\n"
                      f"before {int(pb[i])} {'✓' if ok_b else '✗'}\n{short} {int(pa[i])} {'✓' if ok_a else '✗'}")
        colors.append(charts.GOOD if ok_a else charts.BAD)
    img = charts.image_strip(ev["images"], titles, colors)
    phrase = "with the rejected candidate" if "rejected" in after_label else "after the repair"
    stamped = [i for i, r in enumerate(meta["roles"]) if "stamp" in r or "corrupted" in r]
    summary = ""
    if stamped:
        nb = int(sum(pb[i] == labels[i] for i in stamped))
        na = int(sum(pa[i] == labels[i] for i in stamped))
        summary = (f"<p>Of the {len(stamped)} corrupted or stamped inputs shown, {nb} got their true class before and "
                   f"{na} {phrase}." + (f" The defect pulls inputs to class {_e(target)}." if target is not None
                                                  else "") + "</p>")
    return ("<p class=\"sub\">Each input with its true class and the model's decision before and "
            f"{phrase} (✓ right, ✗ wrong; the caption is green when the decision {phrase} is right). "
            "“test + stamp”: the evidence pairs' corruption transplanted onto a clean test image the "
            "method never saw.</p>" + img + summary)


def _fairness_evidence(ev: dict[str, Any], after_label: str) -> str:
    meta = ev["meta"]
    groups = meta["groups"]
    panels = [{"title": f"positive rate (decision {meta.get('positive_class', '1')})",
               "before": ev["positive_before"], "after": ev["positive_after"]},
              {"title": "accuracy", "before": ev["accuracy_before"], "after": ev["accuracy_after"]},
              {"title": "discrimination rate (lower is better)", "before": ev["discrimination_before"],
               "after": ev["discrimination_after"]}]
    sizes = np.asarray(ev["group_n"])
    keep = sorted(np.argsort(-sizes, kind="stable")[:MAX_GROUPS].tolist())
    if len(keep) < len(groups):
        panels = [{**p, "before": np.asarray(p["before"])[keep], "after": np.asarray(p["after"])[keep]} for p in panels]
    img = charts.group_bars([groups[i] for i in keep], panels, after_label)
    if len(keep) < len(groups):
        img += f"<p class=\"sub\">The chart shows the {len(keep)} largest of {len(groups)} groups; the table has all.</p>"
    rows = "".join(
        f"<tr><td>{_e(g)}</td><td class=num>{int(n)}</td>"
        + "".join(f"<td class=num>{fmt_value('clean_accuracy', float(ev[f'{m}_before'][i]))} → "
                  f"{fmt_value('clean_accuracy', float(ev[f'{m}_after'][i]))}</td>"
                  for m in ("positive", "accuracy", "discrimination")) + "</tr>"
        for i, (g, n) in enumerate(zip(groups, ev["group_n"])))
    table = ("<table><tr><th>group</th><th>test rows</th><th>positive rate</th><th>accuracy</th>"
             f"<th>discrimination rate</th></tr>{rows}</table>")
    return (f"<p class=\"sub\">Per protected group of the test split (protected: {_e(', '.join(meta.get('protected', [])))})"
            f", before and {_e(after_label)}. Discrimination: a row whose decision changes when only its protected "
            "values change.</p>" + img + table)


def _safety_evidence(ev: dict[str, Any], after_label: str) -> str:
    meta = ev["meta"]
    dims = meta["dims"]
    names = [f"input X_{d}" for d in dims]
    img = charts.safety_slices(ev["advisory_before"], ev["advisory_after"], ev["violated_before"], ev["violated_after"],
                               meta["extent"], ev["counterexamples"], names, int(meta["n_outputs"]), after_label)
    others = [i for i in range(len(meta["anchor"])) if i not in dims]
    fixed = ", ".join(f"X_{i} = {meta['anchor'][i]:.4g}" for i in others)
    where = (f"the other inputs fixed at {_e(meta.get('anchor_is', ''))} ({_e(fixed)})" if others else
             "the box's only two inputs")
    return (f"<p class=\"sub\">Property {_e(meta.get('property', ''))}: the advisory (the lowest output) over the two "
            f"widest sides of the input box, {where}. Hatched, outlined in red: the property is violated. ×: the "
            f"{int(meta.get('n_counterexamples', 0))} evidence counterexamples"
            + (", projected onto the slice (they need not lie on it)" if others else "") + ".</p>" + img)


def _evidence(run: Run) -> str:
    ev = run.evidence
    kind = (ev.get("meta") or {}).get("kind")
    try:
        if kind == "images":
            inner = _image_evidence(ev, run.after_label)
        elif kind == "fairness":
            inner = _fairness_evidence(ev, run.after_label)
        elif kind == "safety":
            inner = _safety_evidence(ev, run.after_label)
        elif kind == "error":
            inner = f'<p class="note">Evidence not available: {_e(ev["meta"].get("reason", ""))}</p>'
        elif run.folder is None:
            inner = ('<p class="note">Evidence not available: this report was made from a summary, without the '
                     "run folder's evidence.npz.</p>")
        elif (run.folder / "evidence.npz").is_file():
            inner = f'<p class="note">Evidence not available for a {_e(run.kind or "this")} defect.</p>'
        else:
            inner = ('<p class="note">Evidence not available: this run folder has no evidence.npz (netmend writes it '
                     f"when it repairs a defect it can show inputs for; not available for a {_e(run.kind or 'this')} "
                     "defect, nor in run folders written before netmend recorded it).</p>")
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        inner = f'<p class="note">Evidence could not be drawn: {_e(exc)}</p>'
    return _section("evidence", inner)


def _site_label(s: dict[str, Any]) -> str:
    if s.get("kind") == "neuron" and s.get("index") is not None:
        return f"{s['layer']} #{s['index']}"
    if s.get("kind") == "weight" and s.get("mask_count") is not None:
        return f"{s['layer']} ({s['mask_count']:,} weights)".replace(",", " ")
    return str(s.get("layer"))


def _edited_layer(layer: str, edits: list[dict[str, Any]]) -> bool:
    return any(e["name"].startswith(layer + ".") for e in edits)


def _structure_text(st: dict[str, Any], candidate: bool) -> str:
    before, after = st.get("hidden_before"), st.get("hidden_after") or []
    widths = (f"hidden layers {', '.join(map(str, before))} → {', '.join(map(str, after))}" if before
              else f"hidden layers now {', '.join(map(str, after))}")
    return (f"<p>{'The rejected candidate changed' if candidate else 'The repair changed'} the network's structure, "
            f"not its weights: {_e(widths)} (one layer deeper), {fmt_value('n_', st.get('added_parameters', 0))} "
            "parameters added, every original weight kept as it was. edit.safetensors holds the new layers "
            f"({'candidate-edit.safetensors for the candidate' if candidate else 'chain:&lt;i&gt;.weight / .bias'})."
            "</p>")


def _edit_table(run: Run) -> str:
    if run.metrics.get("structure"):
        return _structure_text(run.metrics["structure"], False)
    if run.metrics.get("candidate_structure"):
        return _structure_text(run.metrics["candidate_structure"], True)
    if not run.edits:
        if run.edits_are_candidate or not run.accepted:
            return "<p class=\"note\">No edit: the gate rejected the candidate and its edit is not in this folder.</p>"
        return "<p class=\"note\">No parameter was edited: the model is the input model.</p>"
    rows = []
    for e in run.edits:
        shape = "×".join(str(s) for s in e["shape"]) if e["shape"] else "—"
        share = (f"{100 * e['changed'] / e['size']:.1f} %" if e["size"] and e["changed"] is not None else "—")
        fro = f"{e['fro']:.4g}" if _num(e["fro"]) else "—"
        rel = f"{100 * e['relative']:.2f} %" if _num(e["relative"]) else "—"
        changed = fmt_value("n_", e["changed"]) if e["changed"] is not None else "—"
        rows.append(f"<tr><td><code>{_e(e['name'])}</code></td><td class=num>{_e(shape)}</td>"
                    f"<td class=num>{changed}</td><td class=num>{share}</td><td class=num>{fro}</td>"
                    f"<td class=num>{rel}</td></tr>")
    total = run.changed_weights if not run.edits_are_candidate else sum(e["changed"] or 0 for e in run.edits)
    head = ("<p class=\"sub\">The rejected candidate's edit (candidate-edit.safetensors), not applied to the model "
            "in this folder.</p>" if run.edits_are_candidate else "")
    return (head + "<table><tr><th>parameter</th><th>shape</th><th>weights changed</th><th>of the parameter</th>"
            "<th>‖ΔW‖<sub>F</sub></th><th>‖ΔW‖ / ‖W‖</th></tr>" + "".join(rows) + "</table>"
            + (f"<p>{fmt_value('n_', total)} weights changed in all.</p>" if total is not None else ""))


def _where(run: Run) -> str:
    out = []
    sites = (run.sites or {}).get("sites") or []
    loc = (run.sites or {}).get("localiser") or run.config.get("localiser")
    if sites:
        top = sites[:20]
        scores = [float(s.get("score") or 0.0) for s in top]
        title = (f"{loc}: {'top ' + str(len(top)) + ' of ' if len(sites) > len(top) else ''}{len(sites)} "
                 f"{'sites' if len(sites) != 1 else 'site'} ranked, best first")
        out.append(f"<h3>Localiser ranking</h3><p class=\"sub\">{_e(loc)} took "
                   f"{_secs((run.sites or {}).get('seconds'))}; {_e(top[0].get('kind', 'layer'))}-level sites; blue: "
                   "a site in a layer whose weights the repair changed.</p>")
        out.append(charts.ranking_bars([_site_label(s) for s in top], scores,
                                       [_edited_layer(s.get("layer", ""), run.edits) for s in top], title))
    elif run.folder is not None:
        out.append(f"<p class=\"note\">No localiser ranking: method {_e(run.name)} "
                   + ("has no localiser; its repairer chooses where to edit itself." if not loc else "recorded no sites.")
                   + "</p>")
    out.append("<h3>Parameters edited</h3>" + _edit_table(run))
    return _section("where", "".join(out))


def _metric_rows(run: Run, keys: Sequence[str]) -> str:
    rows = []
    for k in keys:
        b, a = run.before.get(k), run.after.get(k)
        label, direction, _ = metric_info(k)
        text, cls = change(k, b, a)
        hint = {UP: "↑ better", DOWN: "↓ better", ZERO: "→ 0 better"}.get(direction or "", "")
        rows.append(f"<tr><td>{_e(label)} <code>{_e(k)}</code></td><td class=num>{fmt_value(k, b)}</td>"
                    f"<td class=num>{fmt_value(k, a)}</td><td class=\"num {cls}\">{_e(text)}</td>"
                    f"<td class=neutral>{hint}</td></tr>")
    return (f"<table><tr><th>metric</th><th>before</th><th>{_e(run.after_label)}</th><th>change</th><th></th></tr>"
            + "".join(rows) + "</table>")


def _side_effects(run: Run) -> str:
    out = []
    pb, pa = run.before.get("per_class_accuracy"), run.after.get("per_class_accuracy")
    classes = run.info.get("classes") or []
    if isinstance(pb, list) and isinstance(pa, list) and len(pb) == len(pa) and pb:
        names = [_class_name(classes, i) if len(str(classes[i] if i < len(classes) else "")) <= 12 else str(i)
                 for i in range(len(pb))]
        out.append("<h3>Per-class accuracy</h3>" + charts.per_class_bars(names, pb, pa, run.after_label))
    else:
        out.append("<p class=\"note\">Per-class accuracy not available for this defect.</p>")
    if "robust_accuracy" in run.before:
        out.append("<h3>Backdoor: R-Acc</h3><p class=\"sub\">Triggered inputs (true class not the target) given "
                   "their true class: a repair that only blocks the target class scores low here.</p>"
                   + _metric_rows(run, [k for k in ("robust_accuracy", "robust_accuracy_transplant", "asr_clean")
                                        if k in run.before]))
    if "spur" in run.before and "clean" in run.before:
        out.append("<h3>Spurious class: Clean / Spur.</h3><p class=\"sub\">The class's accuracy on its own test images "
                   "without the pattern (Clean), with it, and the difference (Spur.; 0 means the pattern no longer "
                   "matters).</p>" + _metric_rows(run, ["clean", "with_pattern", "spur"]))
    shown = {run.primary, run.accuracy_key, "robust_accuracy", "robust_accuracy_transplant", "asr_clean", "clean",
             "with_pattern", "spur"}
    rest = [k for k, v in run.before.items() if k not in shown and _num(v)]
    main = [k for k in (run.primary, run.accuracy_key) if k]
    out.append("<h3>Every metric</h3>" + _metric_rows(run, main + rest))
    return _section("side-effects", "".join(out))


def _href(run: Run, name: str, base: Path | None) -> str:
    if run.folder is None:
        return name
    target = run.folder / name
    if base is None:
        return name
    try:
        rel = os.path.relpath(target, base)
    except ValueError:                      # another drive on Windows
        rel = str(target)
    return rel.replace(os.sep, "/")


RUN_FILES = ["report.html", "model.safetensors", "model.onnx", "model.pt2", "model.json", "edit.safetensors",
             "candidate-edit.safetensors", "sites.json", "metrics.json", "config.json", "evidence.npz"]


def _files(run: Run, base: Path | None, skip_report: bool = True) -> str:
    if run.folder is None:
        return "<p class=\"note\">No run folder: this report was made from summaries only.</p>"
    links = []
    for f in RUN_FILES:
        if skip_report and f == "report.html":
            continue
        if (run.folder / f).is_file():
            size = (run.folder / f).stat().st_size
            links.append(f'<span class="nw"><a href="{_e(_href(run, f, base))}">{_e(f)}</a> <span class="neutral">'
                         f'({_size(size)})</span></span>')
    return f'<p class="files">{" ".join(links)}</p>'


def _command(run: Run) -> tuple[str, bool]:
    c = run.config
    if c.get("command"):
        return str(c["command"]), True
    src = c.get("source_model") or "MODEL"
    opts = f" --method {run.name}" if run.name else ""
    return f"netmend repair {src}{opts} --seed {c.get('seed', 0)} --out RUN_FOLDER", False


def _machine(run: Run) -> dict[str, str]:
    m = dict(run.config.get("machine") or {})
    v = run.config.get("versions") or {}
    out = {"platform": m.get("platform") or v.get("machine", "—"), "CPU": m.get("cpu", "—")}
    if m.get("cpu_cores"):
        out["CPU cores"] = m["cpu_cores"]
    out["torch threads"] = m.get("torch_threads") or v.get("cpu_threads", "—")
    if m.get("gpu"):
        out["GPU"] = m["gpu"]
    if run.config.get("device"):
        out["device"] = run.config["device"]
    return {k: str(x) for k, x in out.items()}


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"


def _dl(d: dict[str, Any]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in d.items()) + "</dl>"


def _training(info: dict[str, Any]) -> dict[str, Any]:
    t = info.get("training") or {}
    out = {}
    if info.get("arch") or info.get("dataset"):
        out["model"] = " on ".join(str(x) for x in (info.get("arch"), info.get("dataset")) if x)
    for k in ("epochs", "seed", "optimizer", "lr", "batch_size"):
        if k in t:
            out[f"training {k}"] = t[k]
    return out


def _reproduce(run: Run, base: Path | None) -> str:
    cmd, exact = _command(run)
    v = run.config.get("versions") or {}
    out = [f"<h3>Command</h3><pre>{_e(cmd)}</pre>"]
    if not exact:
        out.append("<p class=\"sub\">Reconstructed: this run folder does not record the command line it was made with"
                   " (see config.json for every option).</p>")
    out.append("<h3>Seed and versions</h3>" + _dl({"seed": run.config.get("seed", "—"),
                                                   **{k: v[k] for k in ("netmend", "torch", "numpy", "python") if k in v},
                                                   **_training(run.info)}))
    out.append("<h3>Machine</h3>" + (_dl(_machine(run)) or "—"))
    out.append("<h3>Files</h3>" + _files(run, base))
    return _section("reproduce", "".join(out))


def render_run(run: Run, base: Path | None = None) -> str:
    """The single-run report. `base`: the folder the page will be written to (links to the run's files are
    relative to it; None: the run folder itself)."""
    cls, word = _status(run)
    title = f"netmend repair: {run.name}" + (" (rejected)" if cls == "rejected" else "")
    sub = f"{_defect_text(run)} · {word}"
    body = _verdict(run) + _evidence(run) + _where(run) + _side_effects(run) + _reproduce(run, base)
    return _page(title, sub, body)


# ----------------------------------------------------------------------------- comparison of runs

def _cmp_verdict(runs: list[Run], skipped: dict[str, str], base: Path | None) -> str:
    first = runs[0]
    pk, ak = first.primary, first.accuracy_key
    same_metric = all(r.primary == pk and r.accuracy_key == ak for r in runs)
    rows = []
    for r in runs:
        cls, word = _status(r)
        cells = []
        for k in ((pk, ak) if same_metric else (r.primary, r.accuracy_key)):
            if not k:
                cells.append("<td>—</td>")
                continue
            b, a = r.before.get(k), r.after.get(k)
            text, c = change(k, b, a)
            cells.append(f"<td class=num>{fmt_value(k, b)} → {fmt_value(k, a)}<br><span class=\"{c}\">{_e(text)}</span>"
                         f"{'' if same_metric else ' <small>' + _e(k) + '</small>'}</td>")
        link = (f'<a href="{_e(_href(r, "report.html", base))}">report</a>' if r.folder is not None and
                (r.folder / "report.html").is_file() else "")
        cw = r.changed_weights
        cw_text = fmt_value("n_", cw) if cw is not None else "—"
        if r.edits_are_candidate:
            cw_text = f"0<br><small>candidate: {fmt_value('n_', sum(e['changed'] or 0 for e in r.edits))}</small>"
        rows.append(f"<tr><td class=m><b>{_e(r.name)}</b></td><td><span class=\"tag {cls}\">{word}</span></td>{''.join(cells)}"
                    f"<td class=num>{_secs(r.metrics.get('seconds'))}</td>"
                    f"<td class=num>{r.metrics.get('samples_used', '—')}</td>"
                    f"<td class=num>{cw_text}</td><td>{link}</td></tr>")
    pl = metric_info(pk)[0] if same_metric and pk else "the defect's metric"
    al = metric_info(ak)[0] if same_metric and ak else "accuracy"
    pdir = {UP: "↑", DOWN: "↓", ZERO: "→ 0"}.get(metric_info(pk)[1] if same_metric and pk else "", "")
    table = (f"<table><tr><th>method</th><th>gate</th><th>{_e(pl)} {pdir}</th><th>{_e(al)} ↑</th><th>time</th>"
             "<th>samples used</th><th>weights changed</th><th></th></tr>" + "".join(rows) + "</table>")
    out = [f"<p>defect: {_defect_text(first)}. Rejected rows show what the candidate did; the gate returned the "
           "input model unchanged.</p>", table]
    if same_metric and pk and ak and all(metric_info(k)[2] == "%" for k in (pk, ak)):
        panels = [{"title": f"{metric_info(k)[0]} ({'lower' if metric_info(k)[1] == DOWN else 'higher'} is better)",
                   "unit": "%", "before": [r.before.get(k) for r in runs], "after": [r.after.get(k) for r in runs],
                   "rejected": [not r.accepted for r in runs]} for k in (pk, ak)]
        out.append(charts.before_after_bars([r.name for r in runs], panels))
    notes = [f"<li><b>{_e(r.name)}</b>: {_e(r.note)}</li>" for r in runs if r.note]
    notes += [f"<li><b>{_e(n)}</b> skipped: {_e(why)}</li>" for n, why in (skipped or {}).items()]
    if notes:
        out.append("<h3>Notes</h3><ul>" + "".join(notes) + "</ul>")
    return _section("verdict", "".join(out))


def _same_images(runs: list[Run]) -> bool:
    evs = [r.evidence for r in runs]
    if not all((e.get("meta") or {}).get("kind") == "images" for e in evs):
        return False
    a = evs[0]
    return all(e["images"].shape == a["images"].shape and np.array_equal(e["images"], a["images"])
               and np.array_equal(e["labels"], a["labels"]) and e["meta"]["roles"] == a["meta"]["roles"] for e in evs)


def _cmp_evidence(runs: list[Run]) -> str:
    if _same_images(runs):
        ev = runs[0].evidence
        meta = ev["meta"]
        classes = meta.get("classes") or []
        labels, pb = ev["labels"], ev["pred_before"]
        titles = [f"{role.replace('evidence: ', '')}\ntrue {_class_name(classes, int(labels[i]))}\n"
                  f"before {int(pb[i])} {'✓' if pb[i] == labels[i] else '✗'}" for i, role in enumerate(meta["roles"])]
        img = charts.image_strip(ev["images"], titles, [charts.GOOD if pb[i] == labels[i] else charts.BAD
                                                        for i in range(len(labels))])
        head = "".join(f"<th>{i + 1}</th>" for i in range(len(labels)))
        rows = []
        for r in runs:
            pa = r.evidence["pred_after"]
            cells = "".join(f"<td class=\"num {'better' if pa[i] == labels[i] else 'worse'}\">{int(pa[i])} "
                            f"{'✓' if pa[i] == labels[i] else '✗'}</td>" for i in range(len(labels)))
            rows.append(f"<tr><td class=m>{_e(r.name)}{'' if r.accepted else ' <small>(candidate, rejected)</small>'}</td>"
                        f"{cells}</tr>")
        return _section("evidence", "<p class=\"sub\">The same evidence inputs for every method (numbered left to "
                        "right), with the decision before the repair; the table gives each method's decision after "
                        "(✓ the true class).</p>" + img + f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>")
    parts = []
    for r in runs:
        sec = _evidence(r)
        inner = sec.split("</h2>", 1)[1].rsplit("</section>", 1)[0]
        parts.append(f"<h3>{_e(r.name)}</h3>{inner}")
    return _section("evidence", "".join(parts))


def _cmp_where(runs: list[Run]) -> str:
    params: list[str] = []
    for r in runs:
        for e in r.edits:
            if e["name"] not in params:
                params.append(e["name"])
    params.sort(key=lambda n: (n.rsplit(".", 1)[0], n.rsplit(".", 1)[-1] != "weight", n))
    out = []
    if params:
        grid = np.full((len(runs), len(params)), np.nan)
        for i, r in enumerate(runs):
            for e in r.edits:
                if _num(e["relative"]):
                    grid[i, params.index(e["name"])] = 100 * e["relative"]
        title = "‖ΔW‖ / ‖W‖ per edited parameter (%; blank: not edited)"
        if len(params) > MAX_PARAM_COLUMNS:             # the most changed parameters, in the model's order
            top = np.argsort(-np.nan_to_num(grid, nan=-1).max(0), kind="stable")[:MAX_PARAM_COLUMNS]
            keep = sorted(top.tolist())
            title += f"; the {len(keep)} most changed of {len(params)} parameters"
            params, grid = [params[j] for j in keep], grid[:, keep]
        if np.isfinite(grid).any():
            out.append(charts.delta_heatmap([r.name + ("" if r.accepted else " (cand.)") for r in runs], params, grid,
                                            title, unit="%",
                                            log_scale=True, fmt=lambda v: f"{v:.3g} %" if v < 1000 else f"{v:,.0f} %"))
    rows = []
    for r in runs:
        sites = (r.sites or {}).get("sites") or []
        loc = (r.sites or {}).get("localiser") or r.config.get("localiser") or "—"
        top = ", ".join(_site_label(s) for s in sites[:5]) + (" …" if len(sites) > 5 else "")
        lines = [f"<code>{_e(e['name'])}</code>: "
                 + (f"{fmt_value('n_', e['changed'])} weights" if e["changed"] is not None else "")
                 + (f", ‖ΔW‖/‖W‖ {100 * e['relative']:.2f} %" if _num(e["relative"]) else "")
                 for e in r.edits[:MAX_EDIT_LINES]]
        if len(r.edits) > MAX_EDIT_LINES:
            rest = r.edits[MAX_EDIT_LINES:]
            lines.append(f"and {len(rest)} more ({fmt_value('n_', sum(e['changed'] or 0 for e in rest))} weights)")
        edits = "<br>".join(lines) or "none"
        if r.edits_are_candidate:
            edits = "<small>the rejected candidate's, not applied:</small><br>" + edits
        rows.append(f"<tr><td class=m>{_e(r.name)}</td><td class=l>{_e(loc)}</td><td class=l>{_e(top) or '—'}</td>"
                    f"<td class=l>{edits}</td></tr>")
    out.append("<table><tr><th>method</th><th class=l>localiser</th><th class=l>its top sites</th>"
               f"<th class=l>parameters edited</th></tr>{''.join(rows)}</table>")
    return _section("where", "".join(out))


def _cmp_side_effects(runs: list[Run]) -> str:
    out = []
    per = [(r.before.get("per_class_accuracy"), r.after.get("per_class_accuracy")) for r in runs]
    n = len(per[0][0]) if isinstance(per[0][0], list) else 0
    if n and all(isinstance(b, list) and isinstance(a, list) and len(b) == len(a) == n for b, a in per):
        classes = runs[0].info.get("classes") or []
        grid = np.array([[100 * (a[j] - b[j]) if _num(a[j]) and _num(b[j]) else np.nan for j in range(n)]
                         for b, a in per])
        out.append("<h3>Per-class accuracy: change in points</h3>"
                   "<p class=\"sub\">Before the repair: "
                   + ", ".join(f"{_e(_class_name(classes, j))} {100 * per[0][0][j]:.1f} %" for j in range(n)) + "</p>"
                   + charts.delta_heatmap([r.name + ("" if r.accepted else " (cand.)") for r in runs],
                                          [_class_name(classes, j) for j in range(n)], grid,
                                          "per-class accuracy after − before (points; green better, red worse, blank unchanged)"))
    keys: list[str] = []
    for r in runs:
        for k, v in r.before.items():
            if _num(v) and k not in (r.primary, r.accuracy_key) and not k.startswith("n_") and k not in keys:
                keys.append(k)
    if keys:
        head = "".join(f"<th>{_e(r.name)}{'' if r.accepted else '<br><small>candidate</small>'}</th>" for r in runs)
        rows = []
        for k in keys:
            have = [r for r in runs if k in r.before]
            shared = len({json.dumps(r.before.get(k)) for r in have}) == 1
            cells = []
            for r in runs:
                if k not in r.before:
                    cells.append("<td class=neutral>—</td>")
                    continue
                text, c = change(k, r.before.get(k), r.after.get(k))
                shown = fmt_value(k, r.after.get(k)) if shared else f"{fmt_value(k, r.before.get(k))} → {fmt_value(k, r.after.get(k))}"
                cells.append(f"<td class=num>{shown}<br><span class=\"{c}\">{_e(text)}</span></td>")
            label, direction, _ = metric_info(k)
            hint = {UP: " ↑", DOWN: " ↓", ZERO: " → 0"}.get(direction or "", "")
            before = f"<td class=num>{fmt_value(k, have[0].before.get(k))}</td>" if shared else "<td class=neutral>per run</td>"
            rows.append(f"<tr><td class=l>{_e(label)}{hint} <code>{_e(k)}</code></td>{before}{''.join(cells)}</tr>")
        out.append("<h3>Other metrics</h3><p class=\"sub\">After the repair, with the change (↑ higher is better, ↓ lower "
                   f"is better).</p><table><tr><th class=l>metric</th><th>before</th>{head}</tr>{''.join(rows)}</table>")
    return _section("side-effects", "".join(out) or "<p class=\"note\">No side-effect metrics recorded.</p>")


def _cmp_reproduce(runs: list[Run], base: Path | None, extra: dict[str, Any] | None) -> str:
    out = []
    extra = extra or {}
    if extra.get("command"):
        out.append(f"<h3>Command</h3><pre>{_e(extra['command'])}</pre>")
    first = runs[0]
    v = first.config.get("versions") or {}
    out.append("<h3>Seed and versions</h3>" + _dl({"seed": first.config.get("seed", "—"),
                                                   **{k: v[k] for k in ("netmend", "torch", "numpy", "python") if k in v},
                                                   **_training(first.info)}))
    out.append("<h3>Machine</h3>" + _dl(_machine(first)))
    rows = []
    for r in runs:
        cmd, exact = _command(r)
        rows.append(f"<h3>{_e(r.name)}</h3><pre>{_e(cmd)}</pre>" + _files(r, base, skip_report=False))
    out.append("".join(rows))
    return _section("reproduce", "".join(out))


def render_comparison(runs: list[Run], title: str, base: Path | None = None, skipped: dict[str, str] | None = None,
                      extra: dict[str, Any] | None = None) -> str:
    """One page comparing runs (of the same model and defect, typically): the same five sections."""
    if not runs:
        body = _section("verdict", "<p class=\"note\">No run to compare.</p>" + "".join(
            f"<p>{_e(n)} skipped: {_e(w)}</p>" for n, w in (skipped or {}).items()))
        body += "".join(_section(i, "<p class=\"note\">No run.</p>") for i, _ in SECTIONS[1:])
        return _page(title, "", body)
    n_acc = sum(_status(r)[0] == "accepted" for r in runs)
    sub = f"{_defect_text(runs[0])} · {len(runs)} runs, {n_acc} accepted with a change"
    body = (_cmp_verdict(runs, skipped or {}, base) + _cmp_evidence(runs) + _cmp_where(runs) + _cmp_side_effects(runs)
            + _cmp_reproduce(runs, base, extra))
    return _page(title, sub, body)


# ----------------------------------------------------------------------------- entry points

def render_report(title: str, results: list[dict[str, Any]], info: dict[str, Any] | None = None,
                  machine: dict[str, Any] | None = None) -> str:
    """A report from summaries alone (RepairResult.summary()): no evidence, sites or files. Prefer
    `render_run(load_run(folder))` / `write_report(folders, out)`, which read everything a run folder holds."""
    runs = [run_from_summary(r, info) for r in results]
    for r in runs:
        if machine:
            r.config["versions"] = dict(machine)
    if len(runs) == 1:
        return render_run(runs[0])
    return render_comparison(runs, title)


def run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders from the paths given: a run folder (metrics.json) or a folder of them (a demo: runs/*/)."""
    from ..errors import NetmendError

    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            out.append(p)
            continue
        inner = sorted(q.parent for q in list(p.glob("runs/*/metrics.json")) + list(p.glob("*/metrics.json")))
        if not p.is_dir() or not inner:
            raise NetmendError(f"{p} is not a run folder (no metrics.json) nor a folder of run folders")
        out += [q for q in inner if q not in out]
    return out


def write_report(paths: Sequence[str | Path], out: str | Path, title: str | None = None,
                 skipped: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write one HTML file: a single-run report for one run folder, a comparison for several."""
    from ..edit import atomic_write

    out = Path(out)
    folders = run_folders(paths)
    runs = [load_run(f) for f in folders]
    base = out.resolve().parent
    runs_abs = [Run(**{**r.__dict__, "folder": r.folder.resolve() if r.folder else None}) for r in runs]
    if len(runs_abs) == 1 and not skipped:
        text = render_run(runs_abs[0], base)
    else:
        text = render_comparison(runs_abs, title or f"netmend: {len(runs)} runs compared", base, skipped, extra)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out
