"""The report's pictures: matplotlib figures (Agg, no pyplot state, no window) embedded as base64 PNG <img> tags.

Every chart is sized for the report's 1200 px column (DPI × inches) and states its scale: rates on a fixed
0–100 % axis, never a bar scaled to its own maximum.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

import numpy as np

BEFORE = "#9aa0a6"        # grey
AFTER = "#1a73e8"         # blue
REJECTED = "#f29900"      # amber: what a rejected candidate would have done
GOOD = "#188038"
BAD = "#d93025"
DPI = 100
FONT = 10


def _figure(width_px: float, height_px: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    fig.set_layout_engine("constrained")
    return fig


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.tick_params(labelsize=FONT - 1)


def to_img(fig, alt: str, css_class: str = "chart") -> str:
    """The figure as an <img> with an inline PNG (its natural size in CSS pixels; it shrinks with the page)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    w, h = (int(round(v)) for v in fig.get_size_inches() * DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="{css_class}" alt="{html.escape(alt)}" width="{w}" height="{h}" '
            f'src="data:image/png;base64,{data}">')


def _pct_axis(ax, axis: str = "x", lo: float = 0.0, hi: float = 100.0) -> None:
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g} %")
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(fmt)


def before_after_bars(labels: Sequence[str], panels: list[dict], width_px: int = 1150) -> str:
    """Horizontal before/after bars per label (methods), one panel per metric, every panel on 0–100 %.

    panel: {"title", "before": [...], "after": [...], "rejected": [bool...], "unit": "%"|"" }; values in [0, 1]
    for "%" (shown ×100)."""
    n = len(labels)
    fig = _figure(width_px, 70 + 34 * n)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    y = np.arange(n)
    for ax, p in zip(axes, panels):
        scale = 100.0 if p.get("unit") == "%" else 1.0
        b = np.array([np.nan if v is None else v * scale for v in p["before"]], dtype=float)
        a = np.array([np.nan if v is None else v * scale for v in p["after"]], dtype=float)
        rej = p.get("rejected") or [False] * n
        colors = [REJECTED if r else AFTER for r in rej]
        ax.barh(y - 0.19, np.nan_to_num(b), 0.36, color=BEFORE, label="before")
        ax.barh(y + 0.19, np.nan_to_num(a), 0.36, color=colors, label="after")
        for i in range(n):
            if not math.isnan(a[i]):
                txt = f"{a[i]:.1f} %" if scale == 100 else f"{a[i]:.4g}"
                ax.text(a[i], y[i] + 0.19, " " + txt, va="center", fontsize=FONT - 2)
        if scale == 100:
            _pct_axis(ax, "x", 0, 112)
            ax.set_xticks([0, 25, 50, 75, 100])
        ax.set_title(p["title"], fontsize=FONT + 1, loc="left")
        ax.invert_yaxis() if ax is axes[0] else None
        ax.grid(axis="x", color="#e8eaed", linewidth=0.8)
        ax.set_axisbelow(True)
        _style(ax)
    axes[0].set_yticks(y, labels)
    from matplotlib.patches import Patch

    handles = [Patch(color=BEFORE, label="before"), Patch(color=AFTER, label="after (accepted)")]
    if any(any(p.get("rejected") or []) for p in panels):
        handles.append(Patch(color=REJECTED, label="candidate (rejected by the gate: model returned unchanged)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=FONT - 1, frameon=False)
    return to_img(fig, "before and after per method: " + ", ".join(p["title"] for p in panels))


def per_class_bars(classes: Sequence[str], before: Sequence[float], after: Sequence[float], after_label: str,
                   width_px: int = 1150) -> str:
    """Per-class accuracy before / after (0–100 %), with the change in points above each class."""
    n = len(classes)
    fig = _figure(width_px, 300)
    ax = fig.subplots()
    x = np.arange(n)
    b = np.array(before, dtype=float) * 100
    a = np.array(after, dtype=float) * 100
    w = 0.38
    ax.bar(x - w / 2, np.nan_to_num(b), w, color=BEFORE, label="before")
    ax.bar(x + w / 2, np.nan_to_num(a), w, color=REJECTED if "rejected" in after_label else AFTER, label=after_label)
    lo = max(0.0, math.floor((np.nanmin(np.concatenate([a, b])) - 10) / 10) * 10) if n else 0.0
    _pct_axis(ax, "y", lo, 108)
    ax.set_yticks(np.arange(lo, 100.1, 10 if 100 - lo > 40 else 5))
    for i in range(n):
        d = a[i] - b[i]
        if math.isnan(d) or abs(d) < 0.05:
            continue
        color = GOOD if d > 0 else BAD
        ax.text(x[i], min(max(a[i], b[i]) + 1, 103), f"{d:+.1f}", ha="center", va="bottom", fontsize=FONT - 1,
                color=color, fontweight="bold")
    ax.set_xticks(x, [str(c) for c in classes], rotation=0 if n <= 12 else 90)
    ax.set_xlabel("class (true label)", fontsize=FONT)
    ax.set_ylabel("accuracy", fontsize=FONT)
    ax.legend(fontsize=FONT - 1, frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2)
    ax.set_axisbelow(True)
    ax.grid(axis="y", color="#e8eaed", linewidth=0.8)
    _style(ax)
    note = "numbers above the bars: change in points (classes without a number did not change)"
    ax.set_title((f"y axis starts at {lo:g} %; " if lo > 0 else "") + note, fontsize=FONT - 1, loc="left",
                 color="#5f6368")
    return to_img(fig, "per-class accuracy before and after")


def _diverging():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("worse_better", ["#c5221f", "#f6aea9", "#ffffff", "#a8dab5", "#137333"])


def delta_heatmap(rows: Sequence[str], cols: Sequence[str], values: np.ndarray, title: str, unit: str = "pt",
                  width_px: int = 1150, log_scale: bool = False, fmt="{:+.1f}", blank_zero: bool = True) -> str:
    """A rows × columns grid of numbers (NaN: blank), annotated. Changes: red (worse, < 0) – white – green (better);
    sizes (`log_scale`): shades of blue on a log axis."""
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    r, c = values.shape
    fig = _figure(width_px, 90 + 30 * r)
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    if log_scale:
        pos = finite[finite > 0]
        vmin = float(pos.min()) if len(pos) else 1e-3
        vmax = float(pos.max()) if len(pos) else 1.0
        norm = LogNorm(vmin=vmin / 2, vmax=max(vmax, vmin * 2))
        data, cmap = np.where(values > 0, values, np.nan), "Blues"
    else:
        m = max(float(np.abs(finite).max()) if len(finite) else 1.0, 1.0)
        norm = TwoSlopeNorm(vmin=-m, vcenter=0.0, vmax=m)
        data, cmap = values, _diverging()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    for i in range(r):
        for j in range(c):
            v = values[i, j]
            if not np.isfinite(v) or (blank_zero and abs(v) < 0.05 and not log_scale):
                continue
            shade = float(norm(v)) if not log_scale else float(norm(max(v, 1e-12)))
            dark = shade > 0.75 if log_scale else (shade < 0.15 or shade > 0.85)
            ax.text(j, i, fmt(v) if callable(fmt) else fmt.format(v), ha="center", va="center", fontsize=FONT - 1,
                    color="white" if dark else "#202124")
    ax.set_yticks(range(r), rows)
    long = c > 12 or max((len(str(s)) for s in cols), default=0) > 10
    ax.set_xticks(range(c), cols, rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_xticks(np.arange(-0.5, c, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, r, 1), minor=True)
    ax.grid(which="minor", color="#dadce0", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=FONT + 1, loc="left")
    ax.tick_params(length=0, labelsize=FONT - 1)
    for s in ax.spines.values():
        s.set_visible(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    cb.ax.tick_params(labelsize=FONT - 2)
    cb.set_label(unit, fontsize=FONT - 1)
    return to_img(fig, title)


def ranking_bars(labels: Sequence[str], scores: Sequence[float], edited: Sequence[bool], title: str,
                 width_px: int = 1150) -> str:
    """Localiser ranking, best first: one bar per site (layer or neuron), edited sites highlighted."""
    n = len(labels)
    fig = _figure(width_px, 70 + 22 * n)
    ax = fig.subplots()
    y = np.arange(n)
    ax.barh(y, scores, 0.7, color=[AFTER if e else BEFORE for e in edited])
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("localiser score", fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1, loc="left")
    ax.grid(axis="x", color="#e8eaed", linewidth=0.8)
    ax.set_axisbelow(True)
    _style(ax)
    from matplotlib.patches import Patch

    if any(edited):
        ax.legend(handles=[Patch(color=AFTER, label="its layer's weights were edited"), Patch(color=BEFORE, label="not edited")],
                  fontsize=FONT - 1, frameon=False, loc="lower right")
    return to_img(fig, title)


def image_strip(images: np.ndarray, titles: Sequence[str], title_colors: Sequence[str], width_px: int = 1150) -> str:
    """The evidence inputs side by side (nearest-neighbour pixels), each with its caption underneath."""
    n = len(images)
    cell = min(140, (width_px - 20) / max(n, 1))
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig = _figure(max(cell * n + 20, 300), cell + 18 * lines + 14)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, img, t, col in zip(axes, images, titles, title_colors):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(t, fontsize=FONT - 1, color=col, linespacing=1.25)
        for s in ax.spines.values():
            s.set_edgecolor("#dadce0")
    return to_img(fig, "evidence inputs with the model's decisions before and after", "strip")


def group_bars(groups: Sequence[str], panels: list[dict], after_label: str, width_px: int = 1150) -> str:
    """Per protected group: one panel per rate (0–100 %), before / after bars."""
    n = len(groups)
    fig = _figure(width_px, 300 if n <= 8 else 300 + 14 * (n - 8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    x = np.arange(n)
    w = 0.38
    for ax, p in zip(axes, panels):
        b = np.array(p["before"], dtype=float) * 100
        a = np.array(p["after"], dtype=float) * 100
        ax.bar(x - w / 2, np.nan_to_num(b), w, color=BEFORE, label="before")
        ax.bar(x + w / 2, np.nan_to_num(a), w, color=REJECTED if "rejected" in after_label else AFTER, label=after_label)
        _pct_axis(ax, "y", 0, 105)
        ax.set_xticks(x, groups, rotation=0 if n <= 3 else 35, ha="center" if n <= 3 else "right", fontsize=FONT - 1)
        ax.set_title(p["title"], fontsize=FONT + 1, loc="left")
        ax.grid(axis="y", color="#e8eaed", linewidth=0.8)
        ax.set_axisbelow(True)
        _style(ax)
    axes[0].legend(fontsize=FONT - 1, frameon=False, loc="upper left", ncols=2)
    return to_img(fig, "rates per protected group before and after")


ADVISORIES_5 = ["COC", "weak left", "weak right", "strong left", "strong right"]


def safety_slices(adv_before: np.ndarray, adv_after: np.ndarray, viol_before: np.ndarray, viol_after: np.ndarray,
                  extent: Sequence[float], cex: np.ndarray, axis_names: Sequence[str], n_outputs: int,
                  after_label: str, width_px: int = 1150) -> str:
    """The advisory over a 2-D slice of the property box, before | after; violated cells hatched, counterexamples ×."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    names = ADVISORIES_5 if n_outputs == 5 else [f"output {k}" for k in range(n_outputs)]
    palette = ["#e8eaed", "#a8dab5", "#aecbfa", "#188038", "#1967d2", "#fdd663", "#f6aea9", "#d7aefb"]
    cmap = ListedColormap(palette[:n_outputs])
    norm = BoundaryNorm(np.arange(-0.5, n_outputs + 0.5), n_outputs)
    fig = _figure(width_px, 440)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, adv, viol, label in ((axes[0], adv_before, viol_before, "before"), (axes[1], adv_after, viol_after, after_label)):
        ax.imshow(adv, origin="lower", extent=extent, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        if viol.any():
            ax.contourf(np.linspace(extent[0], extent[1], viol.shape[1]), np.linspace(extent[2], extent[3], viol.shape[0]),
                        viol.astype(float), levels=[0.5, 1.5], colors="none", hatches=["xxx"])
            ax.contour(np.linspace(extent[0], extent[1], viol.shape[1]), np.linspace(extent[2], extent[3], viol.shape[0]),
                       viol.astype(float), levels=[0.5], colors=BAD, linewidths=1.2)
        if len(cex):
            ax.scatter(cex[:, 0], cex[:, 1], marker="X", s=36, c=BAD, edgecolors="white", linewidths=0.6, zorder=3)
        ax.set_title(f"{label}: {100 * float(viol.mean()):.1f} % of the slice violates", fontsize=FONT + 1, loc="left")
        ax.set_xlabel(axis_names[0], fontsize=FONT)
        _style(ax)
    axes[0].set_ylabel(axis_names[1], fontsize=FONT)
    handles = [Patch(facecolor=palette[k], edgecolor="#5f6368", label=names[k]) for k in range(n_outputs)]
    handles.append(Patch(facecolor="white", edgecolor=BAD, hatch="xxx", label="property violated"))
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], marker="X", linestyle="", color=BAD, markeredgecolor="white",
                          label="evidence counterexamples"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7), fontsize=FONT - 1, frameon=False)
    return to_img(fig, "advisory over a slice of the property box before and after")
