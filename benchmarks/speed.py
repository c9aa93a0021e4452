"""Benchmark: repair time of every backdoor method on one model, against the cost of a pass over the repair data.

    python benchmarks/speed.py                                  # all methods, Fashion-MNIST small CNN, seed 0
    python benchmarks/speed.py --methods "rectify n=1" finetune  # a subset
    python benchmarks/speed.py --repeat 3                       # median of 3 timings per method

For each method, in one run and on the same model (Fashion-MNIST small CNN, BadNets, 10% poisoning, target 0;
trained once and cached under --cache), it prints:
- repair s: `api.repair`'s locate + repair seconds (measuring before/after is not counted);
- floor ratio: repair s / the seconds of one forward + backward pass (cross-entropy, batches of 256) over all the
  repair data (fit + validation split) — how many such passes the method costs;
- vs finetune: repair s / the seconds of `finetune` on the 5% repair split (the baseline the issue compares with);
- peak RSS: each method runs in a forked child process; its peak resident set (ru_maxrss) and the rise over the
  parent's RSS at the fork (the model, the data and the defect are loaded before the fork);
- quality: clean accuracy and ASR after the repair (test set), so a speed-up that costs quality shows.
Writes <out>.md (default benchmarks/results/speed.md). Timings are wall-clock on one torch thread (--threads).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TRIGGERS = {"badnets": {"kind": "badnets", "size": 3}, "blended": {"kind": "blended", "alpha": 0.2}}


def cached_model(cache: Path, dataset: str, arch: str, trigger: str, seed: int):
    """Train (once) the backdoored model the timings run on: 10 % poisoning, target 0; return (model, info)."""
    from netmend.data.triggers import TriggerSpec
    from netmend.modelio import load_model_folder, save_model_folder
    from netmend.train import TrainConfig, default_epochs, train_backdoored

    folder = cache / f"{dataset}-{arch}-{trigger}-s{seed}"
    if not (folder / "model.json").is_file():
        cfg = TrainConfig(epochs=default_epochs(arch, dataset), seed=seed)
        model, info = train_backdoored(dataset, arch, TriggerSpec(**TRIGGERS[trigger]), target=0, poison_rate=0.1,
                                       cfg=cfg)
        save_model_folder(folder, model, info)
    return load_model_folder(folder)


# label -> (method preset, evidence pairs, repair options)
METHODS = {
    "rectify n=1": ("rectify", 1, {}),
    "rectify-static n=1": ("rectify-static", 1, {}),
    "care": ("care", 1, {}),
    "inner n=1": ("inner", 1, {}),
    "finetune 5%": ("finetune", 0, {}),
    "fine-pruning": ("fine-pruning", 1, {}),
}
BASELINE = "finetune 5%"


def rss_mib() -> float:
    """The current resident set of this process (MiB), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def floor_seconds(model, defect, batch_size: int = 256, repeat: int = 3) -> float:
    """Median seconds of one forward + backward pass (cross-entropy) over every repair sample."""
    r = defect.repair
    x, y = torch.cat([r.x_fit, r.x_val]), torch.cat([r.y_fit, r.y_val])
    model.eval()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            loss = F.cross_entropy(model(x[i: i + batch_size]), y[i: i + batch_size])
            loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def _child(conn, model, defect, before, preset, options, seed, threads):
    torch.set_num_threads(threads)
    from netmend.api import repair

    rss0 = rss_mib()
    res = repair(model, defect, method=preset, seed=seed, before=before, repair_options=dict(options))
    conn.send({"seconds": res.seconds, "locate_seconds": res.locate_seconds, "repair_seconds": res.repair_seconds,
               "clean_accuracy": res.after["clean_accuracy"], "asr": res.after["asr"],
               "accepted": res.accepted, "layers": " ".join(res.edit.meta.get("layers", []) or []),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_at_fork_mib": rss0})
    conn.close()


def run_method(model, defect, before, label: str, seed: int, threads: int) -> dict:
    preset, _pairs, options = METHODS[label]
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, model, defect, before, preset, options, seed, threads))
    p.start()
    child.close()
    out = parent.recv()
    p.join()
    return out


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--arch", default="small-cnn")
    p.add_argument("--trigger", default="badnets", choices=list(TRIGGERS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="time each method this many times (median reported)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/speed_models"))
    p.add_argument("--data-dir", default=None, help="data folder (default: $NETMEND_DATA / the checkout's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    from netmend.api import defect_for

    model, info = cached_model(args.cache, args.dataset, args.arch, args.trigger, args.seed)
    model.eval()
    defects, befores = {}, {}
    for label in args.methods:
        n = METHODS[label][1]
        if n not in defects:
            defects[n] = defect_for(info, data_dir=args.data_dir, pairs=n, seed=args.seed)
            defects[n].prepare(model)
            befores[n] = defects[n].metrics(model)
    any_defect = next(iter(defects.values()))
    floor = floor_seconds(model, any_defect)
    n_repair = len(any_defect.repair)
    print(f"floor: one forward + backward pass over the {n_repair} repair samples: {floor:.3f}s", flush=True)
    rows = {}
    for label in args.methods:
        n = METHODS[label][1]
        runs = [run_method(model, defects[n], befores[n], label, args.seed, args.threads) for _ in range(args.repeat)]
        r = dict(runs[0])
        r["seconds"] = statistics.median(x["seconds"] for x in runs)
        r["all_seconds"] = [x["seconds"] for x in runs]
        r["before"] = befores[n]
        rows[label] = r
        print(f"{label}: {r['seconds']:.2f}s ({r['seconds'] / floor:.1f}× the floor), C-Acc {r['clean_accuracy']:.4f} "
              f"ASR {r['asr']:.4f}, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    base = rows.get(BASELINE, {}).get("seconds")
    lines = [f"# speed: repair seconds against a pass over the repair data ({args.dataset} {args.arch}, {args.trigger}, "
             f"seed {args.seed})", "",
             f"machine: {platform.machine()} {platform.system()}, {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} CPU(s) visible, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
             f"python {platform.python_version()}",
             f"command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`",
             f"floor: one forward + backward pass (cross-entropy, batches of 256) over the {n_repair} repair samples "
             f"= {floor:.3f} s (median of 3)", "",
             "| method | repair s | floor ratio | vs finetune 5% | peak RSS MiB | RSS rise MiB | C-Acc before % | "
             "C-Acc after % | ASR before % | ASR after % | layers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        ratio = f"{r['seconds'] / base:.3f}" if base else "–"
        secs = f"{r['seconds']:.2f}" + (f" ({', '.join(f'{s:.2f}' for s in r['all_seconds'])})"
                                        if len(r["all_seconds"]) > 1 else "")
        lines.append(f"| {label} | {secs} | {r['seconds'] / floor:.1f} | {ratio} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['rss_at_fork_mib']:.0f} | {100 * r['before']['clean_accuracy']:.2f} | "
                     f"{100 * r['clean_accuracy']:.2f} | {100 * r['before']['asr']:.2f} | {100 * r['asr']:.2f} | "
                     f"{r['layers']} |")
    lines += ["", "Wall-clock seconds on a shared machine: compare rows of one run, not runs on different machines."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
