"""A self-contained HTML report: the before/after table and bar charts as inline SVG (no JS, no files)."""
from __future__ import annotations

import html
import json
from typing import Any

# metrics where lower is better (the chart says so)
LOWER_IS_BETTER = {"asr", "discrimination_rate", "violation_rate", "heldout_violation_rate", "class_fairness_gap",
                   "spur", "leakage", "net_leakage", "pattern_pull_rate", "counterexamples_found"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}%" if 0 <= v <= 1 else f"{v:.4g}"
    return html.escape(str(v))


def _bars(results: list[dict[str, Any]], key: str) -> str:
    w, row, pad = 520, 22, 150
    rows = [r for r in results if isinstance(r["before"].get(key), (int, float))]
    if not rows:
        return ""
    vmax = max(max(r["before"][key], r["after"].get(key, 0) or 0) for r in rows) or 1.0
    h = row * 2 * len(rows) + 30
    parts = [f'<svg width="{w + pad + 80}" height="{h}" xmlns="http://www.w3.org/2000/svg" font-size="12">']
    for i, r in enumerate(rows):
        y = 10 + i * 2 * row
        for j, (when, color) in enumerate((("before", "#bbb"), ("after", "#2a7"))):
            v = r[when].get(key)
            if not isinstance(v, (int, float)):
                continue
            bw = max(1, int(w * v / vmax))
            parts.append(f'<rect x="{pad}" y="{y + j * row}" width="{bw}" height="{row - 4}" fill="{color}"/>')
            parts.append(f'<text x="{pad + bw + 4}" y="{y + j * row + 13}">{_fmt(v)}</text>')
        parts.append(f'<text x="4" y="{y + row + 4}">{html.escape(r["method"])}</text>')
    parts.append("</svg>")
    note = " (lower is better)" if key in LOWER_IS_BETTER else " (higher is better)"
    return f"<h3>{html.escape(key)}{note}</h3><p>grey: before, green: after</p>" + "".join(parts)


def render_report(title: str, results: list[dict[str, Any]], info: dict[str, Any] | None = None,
                  machine: dict[str, Any] | None = None) -> str:
    keys: list[str] = []
    for r in results:
        for k, v in r["after"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys and not k.startswith("n_"):
                keys.append(k)
    head = "".join(f"<th>{html.escape(k)} before</th><th>{html.escape(k)} after</th>" for k in keys)
    body = ""
    for r in results:
        rejected = r.get("accepted") is False           # show what the candidate did, marked: the model came back
        after = (r.get("candidate_after") or r["after"]) if rejected else r["after"]
        cells = "".join(f"<td>{_fmt(r['before'].get(k, ''))}</td><td><b>{_fmt(after.get(k, ''))}</b></td>" for k in keys)
        label = html.escape(r["method"]) + (' <span style="color:#b00">(rejected)</span>' if rejected else "")
        body += (f"<tr><td>{label}</td>{cells}<td>{r.get('seconds', 0):.2f}</td>"
                 f"<td>{r.get('samples_used', '')}</td></tr>")
    notes = "".join(f"<p>{html.escape(r['method'])}: {html.escape(r['note'])}</p>" for r in results if r.get("note"))
    charts = "".join(_bars(results, k) for k in keys[:4])
    meta = html.escape(json.dumps({k: v for k, v in (info or {}).items() if k in ("arch", "dataset", "defect", "training")},
                                  indent=1, default=str))
    mach = html.escape(json.dumps(machine or {}, default=str))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body><h1>{html.escape(title)}</h1>
<table><tr><th>method</th>{head}<th>seconds</th><th>samples used</th></tr>{body}</table>
{notes}{charts}
<h3>Model</h3><pre>{meta}</pre><h3>Machine</h3><pre>{mach}</pre></body></html>
"""
