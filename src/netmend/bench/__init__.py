"""`netmend bench GRID.toml`: a grid of models × methods × seeds, run locally in parallel or on Ray, resumable.

    from netmend.bench import run_bench
    summary = run_bench("benchmarks/grids/digits-demo.toml", "out/digits", workers=2)
"""
from .grid import load_grid
from .runner import run_bench

__all__ = ["load_grid", "run_bench"]
