"""How many of a model's held-out mistakes does a model RETRAINED from scratch get right?

    python benchmarks/wrong_predictions_ceiling.py                       # Fashion-MNIST small CNN, seed 0, 2 retrains
    python benchmarks/wrong_predictions_ceiling.py --retrains 3 --seed 7

A reference for the wrong-predictions defect, not a repairer. Its metric, "held-out fixed", is the share of the
reference model's misclassified test images (of the evidence classes; here all classes) that the repaired model
classifies right. A repair sees only the repair data (5 % of the training set) and the evidence; a retrain sees the
whole training split the reference was trained on. This script trains `--retrains` models with the reference's
recipe, split and data but other initialisation / shuffling seeds, and reports for each, and for the logit average
of the reference with all retrains, the test accuracy and the share of the reference's test errors it gets right.
If a retrain on 54 000 images fixes a third of the errors at the same accuracy, a rate of one half "at no lower
accuracy" asks a weight edit from 3 000 images for a model clearly better than the recipe itself gives.
Writes benchmarks/results/wrong_predictions_ceiling.md.
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/models/inner"))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--arch", default="small-cnn")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the reference model's seed (the benchmark's model)")
    ap.add_argument("--retrains", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "wrong_predictions_ceiling.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ref, info = cached_model(a.cache, "clean", a.seed, "cpu", a.data_dir, a.dataset, a.arch)
    data = load_dataset(a.dataset, a.data_dir)
    y = data.y_test
    out_ref = logits(ref, data.x_test)
    wrong = out_ref.argmax(1) != y
    rows = [("reference", a.seed, out_ref, 0.0)]
    for k in range(a.retrains):
        init = 1000 + 100 * a.seed + k           # never a seed the benchmarks train with
        t0 = time.perf_counter()
        cfg = TrainConfig(epochs=info["training"]["epochs"] or default_epochs(a.arch, a.dataset), seed=init)
        model, _ = train_backdoored(a.dataset, a.arch, None, cfg=cfg, data_dir=a.data_dir,
                                    split_seed=info["split_seed"], pool_fraction=info["pool_fraction"], data=data)
        rows.append((f"retrain {k + 1}", init, logits(model, data.x_test), time.perf_counter() - t0))
        print(rows[-1][0], f"{time.perf_counter() - t0:.0f} s", flush=True)
    ens = torch.stack([r[2] for r in rows]).mean(0)
    rows.append((f"logit average of the {len(rows)} above", "-", ens, 0.0))
    lines = [f"# Wrong predictions: how many of the reference model's test errors a retrained model gets right",
             "", f"- command: `python benchmarks/wrong_predictions_ceiling.py --seed {a.seed} --retrains {a.retrains}`",
             f"- reference: {a.dataset} {a.arch}, seed {a.seed} (the INNER benchmark's clean model), "
             f"{int(wrong.sum())} of {len(y)} test images misclassified; retrains: same split "
             f"(split seed {info['split_seed']}, {info['n_train']} training images), same recipe, other seeds",
             f"- machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, {a.threads} thread(s)", "",
             "| model | init seed | test accuracy | reference's errors right (held-out fixed) | new errors | train s |",
             "|---|---|---|---|---|---|"]
    for name, seed, out, s in rows:
        pred = out.argmax(1)
        acc = float((pred == y).float().mean())
        fixed = float((pred[wrong] == y[wrong]).float().mean())
        broken = int(((pred != y) & ~wrong).sum())
        lines.append(f"| {name} | {seed} | {100 * acc:.2f} % | {100 * fixed:.1f} % | {broken} | {s:.0f} |")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
