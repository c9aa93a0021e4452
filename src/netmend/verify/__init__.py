"""Complete verification of Linear/ReLU networks against box properties (VNN-LIB, e.g. ACAS Xu).

    from netmend.verify import verify
    result = verify(model, prop, timeout=60)   # VerifyResult: verified | violated (+ counterexample) | unknown

`bounds`: sound bound propagation in float64 over batches of boxes — interval (IBP), CROWN / DeepPoly-style
linear relaxation (per-layer backward bounds for the neurons forward symbolic bounds leave unstable), optional
alpha-CROWN slopes, the optimised combination of a disjunct's rows (λ, α), interval input gradients.
`bab`: the falsifier, then input-splitting branch and bound (`verify`, `VerifyResult`).
`command`: `verify_command`, the `netmend verify MODEL --property P [--timeout S] [--json]` CLI function.
Own implementation: auto_LiRPA (PyPI 0.3) requires torch < 1.13 and torchvision.
"""
from .bab import STATUSES, VerifyResult, verify
from .bounds import (Bounds, ReluNet, crown_bounds, gradient_interval, interval_bounds, intermediate_bounds,
                     optimise_combination, relu_chain)

__all__ = ["verify", "VerifyResult", "STATUSES", "relu_chain", "ReluNet", "interval_bounds", "intermediate_bounds",
           "crown_bounds", "Bounds", "gradient_interval", "optimise_combination"]
