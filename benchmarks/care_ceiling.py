"""How far can CARE's kind of repair (one scale per hidden neuron) go on an ACAS Xu property at all?

    python benchmarks/care_ceiling.py                          # N3,3, strengthened φ2, seed 0
    python benchmarks/care_ceiling.py --net 2_9 --property 8 --seed 30

An upper-bound check, not a repairer: the scales of EVERY hidden ReLU unit are fitted by gradient descent (Adam) on
a smooth stand-in for the PSO's objective — a hinge on the advisory margin of the evidence counterexamples (they
must take a safe advisory) and of the keep samples (drawndown box samples + `--outside` samples outside the box;
they must keep the original advisory). CARE searches a few dozen of these scales with PSO; if even all of them,
fitted by gradient on ten times more keep samples, cannot keep the advisory outside the box, no choice of sites or
swarm setting will. Reports, every `--report` steps, the defect's own metrics: uniform violation rate in the box
(`eval_samples` points) and fidelity outside it (`fidelity_samples` points), as benchmarks/care.py measures them.
Writes benchmarks/results/care_ceiling.md.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch import nn

from netmend.defects.safety import SafetyOptions, advisory, safety_from_info
from netmend.repair.property_tune import decision_hinge
from netmend.zoo.acasxu import load_nnet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None) -> None:
    from netmend.memory import keep_freed_memory

    keep_freed_memory()             # a benchmark: keep freed memory in the process (netmend/memory.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="3_3")
    ap.add_argument("--property", default="phi2-strengthened")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outside", type=int, default=40000, help="outside-box keep samples (the PSO objective: 4000)")
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--report", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--keep-weight", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "care_ceiling.md")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model, info = load_nnet(DATA / "acasxu" / "nnet" / f"ACASXU_run2a_{a.net}_batch_2000.nnet")
    defect = safety_from_info(info, SafetyOptions(property=a.property, seed=a.seed, outside=a.outside), model=model)
    obj = defect.objective(model)
    safe = defect.safe_labels(obj.x_bad)         # the advisory each counterexample should take
    for p in model.parameters():
        p.requires_grad_(False)
    units = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():                         # one scale per unit: learn each layer's width from a pass
        widths = []
        hooks = [m.register_forward_hook(lambda mod, i, o: widths.append(o.shape[-1])) for m in units]
        model(obj.x_good[:1])
        for h in hooks:
            h.remove()
    scales = [torch.ones(w, requires_grad=True) for w in widths]
    for m, s in zip(units, scales):
        m.register_forward_hook(lambda mod, i, o, s=s: o * s)
    opt = torch.optim.Adam(scales, lr=a.lr)
    lines = [f"# CARE ceiling: all {sum(widths)} hidden-unit scales of N{a.net.replace('_', ',')} fitted by gradient",
             "", f"Machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s); seed {a.seed}; property {a.property}; evidence {len(obj.x_bad)} "
             f"counterexamples, keep set {len(obj.x_good)} rows ({a.outside} outside the box); Adam lr {a.lr}, keep "
             f"weight {a.keep_weight}. Command: `python benchmarks/care_ceiling.py --net {a.net} --property "
             f"{a.property} --seed {a.seed} --outside {a.outside} --iterations {a.iterations}`", "",
             "| step | evidence still violating % | keep-set agreement % | violation rate in the box % | falsifier hits | fidelity outside % |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for step in range(1, a.iterations + 1):
        loss = (decision_hinge(defect.decision_logits(model(obj.x_bad)), safe, 0.01)        # argmin: the advisory
                + a.keep_weight * decision_hinge(defect.decision_logits(model(obj.x_good)), obj.y_good, 0.001))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.report == 0 or step == a.iterations:
            m = defect.metrics(model)              # (the falsifier inside needs gradients)
            with torch.no_grad():
                ev = float(obj.violated(model(obj.x_bad)).float().mean())
                keep = float((advisory(model(obj.x_good)) == obj.y_good).float().mean())
            lines.append(f"| {step} | {100 * ev:.2f} | {100 * keep:.2f} | {100 * m['violation_rate']:.4f} | "
                         f"{m['counterexamples_found']} | {100 * m['fidelity']:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - t0:.0f} s in all."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
