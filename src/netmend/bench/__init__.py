"""`netmend bench GRID.toml`: a grid of models × methods × seeds, run locally in parallel or on Ray, resumable.

    from netmend.bench import load_grid, read_cells, run_bench
    summary = run_bench("benchmarks/grids/digits-demo.toml", "out/digits", workers=2)
    cells = read_cells("out/digits", load_grid("benchmarks/grids/digits-demo.toml"))   # one CellResult per cell
"""
from .grid import load_grid
from .results import CellResult, read_cells
from .runner import run_bench

__all__ = ["CellResult", "load_grid", "read_cells", "run_bench"]
