"""The grid's results table: one CSV row per cell and a Markdown table of mean ± std over seeds.

Both are rebuilt from the cell folders (never appended to), in the grid's own cell order, and hold no timings or
machine details: the same grid gives byte-identical tables whichever way and however often it ran. Seconds go
to timings.csv.
"""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from ..edit import atomic_write


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "error"]
    columns += ["error"] if any("error" in r for r in rows) else []      # last, whichever row came first
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a table CSV as written here or by a benchmark script, numbers read back as int or float (an
    empty field stays "")."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def number(text: str) -> int | float | str:
    """`text` as an int, else a float, else unchanged."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _fmt(key: str, values: list[float]) -> str:
    from ..report.html import metric_info

    scale, digits = (100.0, 2) if metric_info(key)[2] in ("%", "pt") else (1.0, 3)
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def markdown(title: str, key_columns: list[str], rows: list[dict[str, Any]]) -> str:
    """Groups of cells that differ only in their seed: `before → after` as mean ± std for every metric."""
    metrics = list(dict.fromkeys(k[len("after_"):] for r in rows for k in r
                                 if k.startswith("after_") and not k.startswith("after_n_")))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key_columns), []).append(r)
    head = [*key_columns, "seeds", "accepted", *[f"{m} before → after" for m in metrics], "changed weights"]
    lines = [f"# {title}", "", "Mean ± standard deviation over the seeds; shares in %.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failed = []
    for key, g in groups.items():
        ok = [r for r in g if r["status"] == "ok"]
        failed += [r for r in g if r["status"] != "ok"]
        cells = [str(k) for k in key] + [f"{len(ok)}/{len(g)}", str(sum(bool(r["accepted"]) for r in ok))]
        for m in metrics:
            b = [r[f"before_{m}"] for r in ok if r.get(f"before_{m}") not in (None, "")]
            a = [r[f"after_{m}"] for r in ok if r.get(f"after_{m}") not in (None, "")]
            cells.append(f"{_fmt(m, b)} → {_fmt(m, a)}" if a and b else "–")
        cw = [float(r["changed_weights"]) for r in ok]
        cells.append(f"{statistics.mean(cw):.0f}" if cw else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", "Failed cells:", ""]
        lines += [f"- {r['cell']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, title: str, key_columns: list[str], rows: list[dict[str, Any]],
                 timings: list[dict[str, Any]]) -> None:
    """results.csv, results.md and timings.csv under `out`, each replaced atomically."""
    _write_text(out / "results.csv", _csv(rows) if rows else "")
    _write_text(out / "results.md", markdown(title, key_columns, rows))
    _write_text(out / "timings.csv", _csv(timings) if timings else "")
