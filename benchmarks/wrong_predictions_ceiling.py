"""How many of a model's held-out mistakes does a model RETRAINED from scratch get right?

    python benchmarks/wrong_predictions_ceiling.py                       # Fashion-MNIST small CNN, seed 0, 2 retrains
    python benchmarks/wrong_predictions_ceiling.py --retrains 3 --seed 7
    python benchmarks/wrong_predictions_ceiling.py --reference mislabelled --seed 1   # the label-noise models

A reference for the wrong-predictions defect, not a repairer. Its metric, "held-out fixed", is the share of the
reference model's misclassified test images (of the evidence classes; here all classes) that the repaired model
classifies right. A repair sees only the repair data (5 % of the training set) and the evidence; a retrain sees the
whole training split the reference was trained on. This script trains `--retrains` models with the reference's
recipe, split and data but other initialisation / shuffling seeds, and reports for each, and for the logit average
of the reference with all retrains, the test accuracy and the share of the reference's test errors it gets right.
If a retrain on 54 000 images fixes a third of the errors at the same accuracy, a rate of one half "at no lower
accuracy" asks a weight edit from 3 000 images for a model clearly better than the recipe itself gives.

`--reference mislabelled` takes the benchmark's label-noise model (40 % of one class labelled as another) instead,
and retrains with the RIGHT labels: the first retrain keeps the reference's own initialisation and shuffling seed,
so it is the model the noise spoiled, the rest use other seeds. Both shares are reported: of all the reference's
errors, and of its errors on the mislabelled class (the `mislabelled-class` case's evidence class).
Writes benchmarks/results/wrong_predictions_ceiling[-mislabelled-s<seed>].md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from inner import cached_model  # noqa: E402  (the INNER benchmark's cached reference models)

from netmend.data.datasets import load_dataset  # noqa: E402
from netmend.metrics import logits  # noqa: E402
from netmend.train import TrainConfig, default_epochs, train_backdoored  # noqa: E402


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/models/inner"))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--arch", default="small-cnn")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the reference model's seed (the benchmark's model)")
    ap.add_argument("--reference", choices=["clean", "mislabelled"], default="clean",
                    help="the benchmark model whose errors are counted")
    ap.add_argument("--retrains", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    noisy = a.reference == "mislabelled"
    out_path = a.out or Path(__file__).parent / "results" / (
        f"wrong_predictions_ceiling-mislabelled-s{a.seed}.md" if noisy else "wrong_predictions_ceiling.md")
    torch.set_num_threads(a.threads)
    ref, info = cached_model(a.cache, a.reference, a.seed, "cpu", a.data_dir, a.dataset, a.arch)
    data = load_dataset(a.dataset, a.data_dir)
    y = data.y_test
    out_ref = logits(ref, data.x_test)
    wrong = out_ref.argmax(1) != y
    source = info["defect"]["mislabelled"]["class"] if noisy else None
    rows = [("reference", a.seed, out_ref, 0.0)]
    for k in range(a.retrains):
        # never a seed the benchmarks train with; for a label-noise reference the first is its own, labels right
        init = a.seed if noisy and k == 0 else 1000 + 100 * a.seed + k
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=info["training"]["epochs"] or default_epochs(a.arch, a.dataset), seed=init)
        model, _ = train_backdoored(a.dataset, a.arch, None, cfg=cfg, data_dir=a.data_dir,
                                    split_seed=info["split_seed"], pool_fraction=info["pool_fraction"], data=data)
        rows.append((f"retrain {k + 1}", init, logits(model, data.x_test), time.perf_counter() - t0))
        print(rows[-1][0], f"{time.perf_counter() - t0:.0f} s", flush=True)
    ens = torch.stack([r[2] for r in rows]).mean(0)
    rows.append((f"logit average of the {len(rows)} above", "-", ens, 0.0))
    command = f"python benchmarks/wrong_predictions_ceiling.py --seed {a.seed} --retrains {a.retrains}"
    if noisy:
        m = info["defect"]["mislabelled"]
        kind = (f"the INNER benchmark's `mislabelled` model: {100 * m['fraction']:.0f} % of class {source} labelled "
                f"{m['as']} in training; retrains with the right labels, the first with the reference's own seed")
        command += " --reference mislabelled"
    else:
        kind = "the INNER benchmark's clean model; retrains: other seeds"
    src_col = f" | class {source} errors right" if noisy else ""
    lines = ["# Wrong predictions: how many of the reference model's test errors a retrained model gets right",
             "", f"- command: `{command}`",
             f"- reference: {a.dataset} {a.arch}, seed {a.seed} ({kind}); {int(wrong.sum())} of {len(y)} test "
             f"images misclassified; same split (split seed {info['split_seed']}, {info['n_train']} training "
             "images), same recipe",
             f"- machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, {a.threads} thread(s)", "",
             f"| model | init seed | test accuracy | reference's errors right (held-out fixed){src_col} | new errors "
             "| train s |", "|---|---|---|---|---|---|" + ("---|" if noisy else "")]
    for name, seed, out, s in rows:
        pred = out.argmax(1)
        acc = float((pred == y).float().mean())
        fixed = float((pred[wrong] == y[wrong]).float().mean())
        broken = int(((pred != y) & ~wrong).sum())
        cls = ""
        if noisy:
            w = wrong & (y == source)
            cls = f" | {100 * float((pred[w] == y[w]).float().mean()):.1f} % of {int(w.sum())}"
        lines.append(f"| {name} | {seed} | {100 * acc:.2f} % | {100 * fixed:.1f} %{cls} | {broken} | {s:.0f} |")
    out_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
