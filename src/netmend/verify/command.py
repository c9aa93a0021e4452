"""`netmend verify MODEL --property P [--timeout S] [--json]`: prove a safety property or find a counterexample.

Exit codes: 0 verified, 1 violated (a counterexample, re-checked by a forward pass), 3 unknown (timeout);
a user's mistake (missing file, unsupported layer) raises NetmendError (the CLI prints one line, exit 2).
"""
from __future__ import annotations

import typer

EXIT_CODES = {"verified": 0, "violated": 1, "unknown": 3}


def _raw_input(x, info: dict):
    """The counterexample in raw units when the model carries .nnet-style normalisation, else None."""
    a = info.get("arch_args", {}) if isinstance(info, dict) else {}
    if not all(k in a for k in ("input_mean", "input_range")):
        return None
    n = len(x)
    return [float(v) * float(r) + float(m) for v, r, m in zip(x, a["input_range"][:n], a["input_mean"][:n])]


def verify_command(
    model: str = typer.Argument(..., help="network file (.nnet, .onnx) or model folder: a Linear/ReLU chain"),
    prop: str = typer.Option(..., "--property", help="safety property: FILE.vnnlib, prop_N / phiN, or a built-in"),
    timeout: float = typer.Option(60.0, help="seconds before answering unknown"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    seed: int = typer.Option(0, help="seed of the falsifier and the attacks"),
    device: str = typer.Option("cpu", help="torch device for the bounds"),
) -> None:
    """Verify a ReLU network against a box property: verified (proved), violated (counterexample) or unknown."""
    from ..data.vnnlib import check_network
    from ..defects.safety import resolve_property
    from ..jsonsafe import dumps
    from ..errors import NetmendError
    from ..modelio import load_any_model
    from .bab import verify

    if timeout < 0:
        raise NetmendError(f"--timeout must be ≥ 0, got {timeout}")
    net, info = load_any_model(model)
    p = resolve_property(prop)
    check_network(p, net)
    res = verify(net, p, timeout=timeout, seed=seed, device=device)
    cex = None
    if res.counterexample is not None:
        cex = {"input": [float(v) for v in res.counterexample], "output": [float(v) for v in res.output],
               "found_by": res.found_by}
        raw = _raw_input(res.counterexample.tolist(), info)
        if raw is not None:
            cex["input_raw"] = raw
    out = {"model": model, "property": p.name, "status": res.status, "seconds": round(res.seconds, 3),
           "counterexample": cex, "boxes": res.boxes, "max_depth": res.max_depth,
           "lower_bound": res.lower_bound, "root_lower_bound": res.root_lower_bound, "reason": res.reason,
           "timeout": timeout, "seed": seed}
    if json_out:
        print(dumps(out))
    else:
        from rich.console import Console
        from rich.table import Table

        colour = {"verified": "green", "violated": "red", "unknown": "yellow"}[res.status]
        t = Table(title=f"verify {p.name} on {model}", show_header=False)
        t.add_row("status", f"[bold {colour}]{res.status}[/]")
        t.add_row("seconds", f"{res.seconds:.2f}")
        t.add_row("sub-boxes bounded", str(res.boxes))
        t.add_row("max split depth", str(res.max_depth))
        if res.lower_bound is not None:
            t.add_row("certified lower bound", f"{res.lower_bound:.6g} (> 0 proves the property)")
        if cex is not None:
            t.add_row("counterexample (normalised)", ", ".join(f"{v:.6g}" for v in cex["input"]))
            if "input_raw" in cex:
                t.add_row("counterexample (raw units)", ", ".join(f"{v:.6g}" for v in cex["input_raw"]))
            t.add_row("output", ", ".join(f"{v:.6g}" for v in cex["output"]))
            t.add_row("found by", cex["found_by"])
        if res.reason:
            t.add_row("note", res.reason)
        Console().print(t)
    raise typer.Exit(EXIT_CODES[res.status])
