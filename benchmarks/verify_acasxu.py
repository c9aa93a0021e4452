"""The complete verifier on the VNN-COMP ACAS Xu benchmark (186 instances), checked against sampling.

    python benchmarks/verify_acasxu.py                      # all 186, 60 s each, resumes a partial CSV
    python benchmarks/verify_acasxu.py --timeout 116 --instances 1-45 --limit 10
    python benchmarks/verify_acasxu.py --report             # rewrite the .md from the CSV only

For every instance (onnx, vnnlib, VNN-COMP timeout) of data/acasxu/vnnlib/acasxu_instances.csv:
  1. `netmend.verify.verify` with the per-instance --timeout (not the VNN-COMP one: this is a shared CPU);
  2. an independent search: the safety defect's falsifier (`falsify`, seed + 1, 2048 starts × 50 steps) and
     --samples uniform box samples (seed + 2) — agreement: a verified instance must have no sampled or
     falsified counterexample; a violated one must have a counterexample that is in the box and unsafe under a
     plain forward pass of the network (re-checked here);
  3. the time of 10⁶ forward samples of the same network (chunks of 65 536) — the "ratio" column is
     verification seconds / that time.
Rows are appended to benchmarks/results/verify_acasxu.csv as they finish (done rows are skipped on a rerun
with the same timeout and seed); the .md summary is rewritten after every row.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from netmend.defects.safety import falsify, resolve_property  # noqa: E402
from netmend.modelio import load_any_model  # noqa: E402
from netmend.verify import verify  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "acasxu"
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ["index", "network", "property", "status", "seconds", "boxes", "max_depth", "lower_bound", "found_by",
          "falsifier_found", "sampled_violations", "cex_checked", "agreement", "forward_1e6_s", "ratio",
          "timeout", "seed", "vnncomp_timeout"]


def parse_instances(spec: str | None, n: int) -> list[int]:
    """'1-45,100,180-186' (1-based, inclusive) -> sorted 0-based indices."""
    if not spec:
        return list(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a) - 1, int(b)))
        elif part:
            out.add(int(part) - 1)
    return sorted(i for i in out if 0 <= i < n)


def net_name(onnx: str) -> str:
    parts = Path(onnx).stem.split("_")
    return f"N{parts[2]},{parts[3]}" if len(parts) > 3 else Path(onnx).stem


@torch.no_grad()
def forward_time(model, prop, n: int = 1_000_000, seed: int = 0) -> float:
    x = prop.sample(n, torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    for i in range(0, n, 1 << 16):
        model(x[i: i + (1 << 16)])
    return time.perf_counter() - t0


def run_instance(i: int, onnx: str, vnnlib: str, vnn_timeout: str, args) -> dict:
    model, _ = load_any_model(DATA / "onnx" / onnx)
    model.eval()
    prop = resolve_property(str(DATA / "vnnlib" / vnnlib))
    res = verify(model, prop, timeout=args.timeout, seed=args.seed)
    # independent search for counterexamples
    fal = falsify(model, prop, args.seed + 1, starts=2048, steps=50, want=0)
    with torch.no_grad():
        xs = prop.sample(args.samples, torch.Generator().manual_seed(args.seed + 2))
        sampled = int(sum(int(prop.violated(model(xs[j: j + (1 << 16)])).sum()) for j in range(0, len(xs), 1 << 16)))
    found = len(fal.counterexamples) > 0 or sampled > 0
    checked = ""
    if res.status == "violated":
        x = res.counterexample
        with torch.no_grad():
            checked = str(bool(prop.in_box(x)) and bool(prop.violated(model(x.unsqueeze(0)))[0]))
        agreement = "yes" if checked == "True" else "NO (counterexample fails the check)"
    elif res.status == "verified":
        agreement = "yes" if not found else "NO (sampling found a counterexample)"
    else:
        agreement = "n/a (unknown)"
    fwd = forward_time(model, prop, seed=args.seed)
    return {"index": i + 1, "network": net_name(onnx), "property": Path(vnnlib).stem, "status": res.status,
            "seconds": f"{res.seconds:.3f}", "boxes": res.boxes, "max_depth": res.max_depth,
            "lower_bound": "" if res.lower_bound is None else f"{res.lower_bound:.3g}", "found_by": res.found_by,
            "falsifier_found": "yes" if found else "no", "sampled_violations": sampled, "cex_checked": checked,
            "agreement": agreement, "forward_1e6_s": f"{fwd:.3f}", "ratio": f"{res.seconds / fwd:.1f}",
            "timeout": args.timeout, "seed": args.seed, "vnncomp_timeout": vnn_timeout}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_report(rows: list[dict], args, total_instances: int, command: str) -> None:
    rows = sorted({int(r["index"]): r for r in rows}.values(), key=lambda r: int(r["index"]))   # last run wins
    counts = {s: sum(r["status"] == s for r in rows) for s in ("verified", "violated", "unknown")}
    secs = [float(r["seconds"]) for r in rows]
    solved = [float(r["seconds"]) for r in rows if r["status"] != "unknown"]
    disagree = [r for r in rows if r["agreement"].startswith("NO")]
    unk_found = sum(r["status"] == "unknown" and r["falsifier_found"] == "yes" for r in rows)
    vio = [r for r in rows if r["status"] == "violated"]
    vio_indep = sum(r["falsifier_found"] == "yes" for r in vio)
    by_finder = {k: sum(r["found_by"] == k for r in vio) for k in ("falsifier", "bab-candidate", "bab-pgd")}
    slow = sorted(rows, key=lambda r: -float(r["seconds"]))[:5]
    ratios = [float(r["ratio"]) for r in rows]
    lines = [
        "# Complete verification of ACAS Xu (VNN-COMP instances)", "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared), "
        f"torch {torch.__version__}, torch.set_num_threads({torch.get_num_threads()}), CPU, float64 bounds. Seed {args.seed}. "
        f"Per-instance timeout {args.timeout:g} s (VNN-COMP's is 116 s, on their hardware).",
        f"Command: `{command}`", "",
        "Method: `netmend.verify.verify` — the safety falsifier first, then input-splitting branch and bound with "
        "CROWN-style linear relaxation bounds (float64; per-layer backward bounds for the neurons forward symbolic "
        "bounds leave unstable), averages of each disjunct's rows, ReluVal gradient smear branching, batches of up "
        "to 1024 sub-boxes per tensor pass; after the first second, sub-boxes CROWN leaves open get 10 Adam steps "
        "on the combination λ of the disjunct's rows and the lower ReLU slopes α (defaults of `verify`).",
        "Agreement: an independent falsifier run (seed + 1, 2048 PGD starts) plus "
        f"{args.samples:,} uniform samples per instance must find nothing on a verified instance; a violated "
        "instance's counterexample is re-checked (in the box, unsafe under a plain forward pass).",
        "Ratio: verification seconds / seconds of 10⁶ forward samples of the same network.", "",
        f"**Completed {len(rows)} of {total_instances} instances: {counts['verified']} verified, "
        f"{counts['violated']} violated, {counts['unknown']} unknown (timeout).** "
        f"Disagreements: {len(disagree)}. Unknown instances where sampling/falsifier found a counterexample: "
        f"{unk_found}. Violated instances whose counterexample the independent search (2048 PGD starts + "
        f"uniform samples) also found: {vio_indep} of {len(vio)}; the verifier's counterexamples came from "
        + ", ".join(f"{k} {v}" for k, v in by_finder.items()) + ".", ""]
    if secs:
        lines.append(f"Time: total {sum(secs):.1f} s, median {statistics.median(secs):.2f} s over all completed "
                     f"instances (timeouts count as their timeout); solved instances: median "
                     f"{statistics.median(solved) if solved else float('nan'):.2f} s, max "
                     f"{max(solved) if solved else float('nan'):.1f} s. Ratio to 10⁶ forward samples: median "
                     f"{statistics.median(ratios):.1f}. Slowest: "
                     + ", ".join(f"{r['network']} {r['property']} {float(r['seconds']):.1f} s ({r['status']}, "
                                 f"{r['boxes']} sub-boxes)" for r in slow) + ".")
        lines.append("")
        by_prop: dict[str, dict[str, int]] = {}
        for r in rows:
            by_prop.setdefault(r["property"], {"verified": 0, "violated": 0, "unknown": 0})[r["status"]] += 1
        lines += ["| property | verified | violated | unknown |", "|---|---|---|---|"]
        for p in sorted(by_prop, key=lambda s: int(s.split("_")[1])):
            c = by_prop[p]
            lines.append(f"| {p} | {c['verified']} | {c['violated']} | {c['unknown']} |")
        lines.append("")
    lines += ["| # | network | property | status | seconds | boxes | depth | lower bound | found by | "
              "falsifier/sampling found | agreement | 10⁶ fwd s | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['network']} | {r['property']} | {r['status']} | {r['seconds']} | "
                     f"{r['boxes']} | {r['max_depth']} | {r['lower_bound']} | {r['found_by']} | "
                     f"{r['falsifier_found']} ({r['sampled_violations']} sampled) | {r['agreement']} | "
                     f"{r['forward_1e6_s']} | {r['ratio']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per instance (default 60)")
    ap.add_argument("--instances", default=None, help="1-based ranges of the instance list, e.g. 1-45,181-186")
    ap.add_argument("--limit", type=int, default=None, help="run at most N new instances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=100_000, help="uniform samples per instance for the agreement check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="verify_acasxu", help="results file stem under benchmarks/results/")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from the CSV")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (DATA / "vnnlib" / "acasxu_instances.csv").open() as f:
        instances = [row for row in csv.reader(f) if row]
    csv_path = RESULTS / f"{args.name}.csv"
    rows = read_rows(csv_path)
    if args.report and rows:
        args.timeout, args.seed = float(rows[-1]["timeout"]), int(rows[-1]["seed"])
    command = f"python benchmarks/verify_acasxu.py --timeout {args.timeout:g} --seed {args.seed}"
    command += f" --instances {args.instances}" if args.instances else ""
    if args.report:
        write_report(rows, args, len(instances), command)
        return
    done = {(int(r["index"]), float(r["timeout"]), int(r["seed"])) for r in rows}
    todo = [i for i in parse_instances(args.instances, len(instances)) if (i + 1, args.timeout, args.seed) not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    new = not csv_path.is_file()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for k, i in enumerate(todo):
            onnx, vnnlib, vt = instances[i]
            row = run_instance(i, onnx, vnnlib, vt, args)
            w.writerow(row)
            f.flush()
            rows.append({key: str(v) for key, v in row.items()})
            print(f"[{k + 1}/{len(todo)}] #{i + 1} {row['network']} {row['property']}: {row['status']} "
                  f"{row['seconds']} s, {row['boxes']} boxes, agreement {row['agreement']}", flush=True)
            write_report(rows, args, len(instances), command)
    write_report(rows, args, len(instances), command)


if __name__ == "__main__":
    main()
