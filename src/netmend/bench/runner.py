"""Running a grid: claim (or resume) the output folder, train the missing models, run the missing cells on local
worker processes or Ray tasks, then rebuild the tables and the report from the cell folders.

Only this driver writes the output folder; each cell folder appears whole (built beside itself, renamed into place),
so a run killed at any point resumes by running exactly the cells that have no folder yet.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

from ..devices import check_device
from ..errors import NetmendError, first_line
from ..modelio import check_fresh_out, fresh_folder, write_json
from .cells import Files, cell_task, one_thread, pack, train_task, unpack
from .grid import Plan, load_grid
from .results import cell_paths, read_cells
from .table import write_tables

Job = tuple[str, Callable[..., dict], tuple, bool]       # (key, task, arguments, needs a GPU)
MARKER = "bench.json"


class Local:
    """Worker processes (spawned: no forked torch state), one torch thread each; one worker runs in this process."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def describe(self) -> str:
        return f"{self.workers} local worker{'s' if self.workers > 1 else ''}"

    def share(self, obj: Any) -> Any:
        return obj

    def run(self, jobs: list[Job]) -> Iterator[tuple[str, dict]]:
        if not jobs:
            return
        if self.workers == 1:
            yield from self._here(jobs)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=one_thread)
        futures = {self.pool.submit(task, *args): key for key, task, args, _ in jobs}
        for f in as_completed(futures):
            try:
                yield futures[f], f.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (out of memory, killed)
                yield futures[f], {"error": f"worker failed: {type(exc).__name__}: {first_line(exc)}"}

    def _here(self, jobs: list[Job]) -> Iterator[tuple[str, dict]]:
        """The tasks in this process, under the workers' settings (one thread), restored afterwards."""
        import torch

        threads, quiet = torch.get_num_threads(), os.environ.get("NETMEND_QUIET")
        try:
            for key, task, args, _ in jobs:
                yield key, task(*args)
        finally:
            torch.set_num_threads(threads)
            if quiet is None:
                os.environ.pop("NETMEND_QUIET", None)
            else:
                os.environ["NETMEND_QUIET"] = quiet

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class Ray:
    """Ray tasks (`ray.remote`, `ray.wait`): one CPU each, and one GPU where the cell runs on CUDA."""

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise NetmendError("--ray needs Ray: pip install 'netmend[ray]'") from None
        self.ray, self.started, self.remote = ray, False, {}
        if not ray.is_initialized():          # a caller (or a test) may have started one already: use it
            try:
                if address == "local":
                    ray.init(include_dashboard=False, logging_level="WARNING")
                else:
                    ray.init(address=address, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise NetmendError(f"--ray {address}: cannot reach a Ray cluster ({first_line(exc)})") from None
            self.started = True

    def describe(self) -> str:
        return f"Ray ({int(self.ray.cluster_resources().get('CPU', 0))} CPUs)"

    def share(self, obj: Any) -> Any:
        return self.ray.put(obj)              # a model is sent to the object store once, not once per cell

    def run(self, jobs: list[Job]) -> Iterator[tuple[str, dict]]:
        refs = {}
        for key, task, args, gpu in jobs:
            if task not in self.remote:
                self.remote[task] = self.ray.remote(task)
            refs[self.remote[task].options(num_cpus=1, num_gpus=1 if gpu else 0).remote(*args)] = key
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield refs[ref], self.ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a crashed worker or lost node: this cell fails
                    yield refs[ref], {"error": f"Ray task failed: {type(exc).__name__}: {first_line(exc)}"}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _claim(out: Path, plan: Plan) -> bool:
    """A new or empty folder, or this same grid's earlier output (True: resume). Never another grid's output."""
    marker = out / MARKER
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text())
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("grid_hash") != plan.hash:
            raise NetmendError(f"--out {out} holds the output of a different grid ({earlier.get('grid_file')}); "
                               f"choose a new folder, or the same grid file to resume")
        return True
    check_fresh_out(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"grid_hash": plan.hash, "grid_file": str(plan.path), "title": plan.grid.title,
                        "cells": len(plan.cells)})
    shutil.copyfile(plan.path, out / "grid.toml")
    return False


def _store_model(folder: Path, files: Files) -> None:
    """Put a trained model in the cache (whole or not at all); another bench sharing the cache may have won."""
    try:
        with fresh_folder(folder) as tmp:
            unpack(files, tmp)
    except NetmendError:
        if not (folder / "model.json").is_file():
            raise


def run_bench(grid: str | Path, out: str | Path, workers: int | None = None, ray: str | None = None,
              cache: str | Path | None = None, limit: int | None = None, only: list[str] | None = None,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the cells of `grid` that `out` does not hold yet (at most `limit`; with `only`, just those methods'
    cells: a change that touches some methods reruns only theirs), then rewrite the tables and report."""
    t_start = time.perf_counter()
    plan = load_grid(grid)
    if workers is not None and workers < 1:
        raise NetmendError(f"--workers must be ≥ 1, got {workers}")
    if limit is not None and limit < 0:
        raise NetmendError(f"--limit must be ≥ 0, got {limit}")
    unknown = sorted(set(only or ()) - set(plan.grid.methods))
    if unknown:
        raise NetmendError(f"--only {', '.join(unknown)}: not a method of {plan.path.name} "
                           f"({', '.join(plan.grid.methods)})")
    if not ray:                          # local workers run on this machine's devices (a Ray cluster has its own)
        check_device(plan.grid.device, "the grid's device")
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "models"
    if cache.exists() and not cache.is_dir():
        raise NetmendError(f"--cache {cache} is not a folder")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    backend = Ray(ray) if ray else Local(workers or cores)
    where = backend.describe()
    try:
        resumed = _claim(out, plan)
        for d in (out / "cells", out / "failed"):
            d.mkdir(exist_ok=True)
        for stale in (out / "cells").iterdir():       # a cell folder without its record, or a killed run's partial
            if stale.is_dir() and not (stale / "cell.json").is_file():
                shutil.rmtree(stale, ignore_errors=True)
        finished = [c.id for c in plan.cells if (cell_paths(out, c.id)[0] / "cell.json").is_file()]
        todo = [c for c in plan.cells if c.id not in set(finished)]
        left = [c for c in todo if only and c.coords["method"] not in only]
        todo = [c for c in todo if not only or c.coords["method"] in only]
        left += todo[limit:] if limit is not None else []
        todo = todo[:limit] if limit is not None else todo
        log(f"{plan.path.name}: {len(plan.cells)} cells, {len(finished)} done before, {len(todo)} to run on "
            f"{where}" + (f", {len(left)} left for later (--limit / --only)" if left else ""))
        ran, failed, trained = [], {}, []
        try:
            model_errors = _models(plan, todo, cache, backend, trained, log)
            _cells(plan, todo, out, cache, backend, model_errors, ran, failed, log)
        finally:
            _finish(plan, out)
    finally:
        backend.close()
    return {"out": str(out), "grid": str(plan.path), "resumed": resumed, "cells": len(plan.cells), "ran": ran,
            "done_before": finished, "failed": failed, "left": [c.id for c in left], "models_trained": len(trained),
            "backend": where, "seconds": time.perf_counter() - t_start}


def _models(plan: Plan, todo, cache: Path, backend, trained: list, log) -> dict[str, str]:
    """Train every model the cells to run need and the cache lacks; {model key: error} for those that failed."""
    jobs, errors = [], {}
    for key in dict.fromkeys(c.model_key for c in todo):
        recipe = plan.models[key]
        if "train" in recipe and not (cache / key / "model.json").is_file():
            jobs.append((key, train_task, (recipe["train"], todo[0].data_dir), recipe["train"]["device"] != "cpu"))
    for i, (key, res) in enumerate(backend.run(jobs), 1):
        r = plan.models[key]["train"]
        planted = r["trigger"]["kind"] if "trigger" in r else r.get("defect", "backdoor")
        what = f"model {r['dataset']}/{r['arch']}/{planted} seed {r['train']['seed']}"
        if "error" in res:
            errors[key] = res["error"]
            log(f"  [{i}/{len(jobs)}] {what}: training failed: {res['error']}")
            continue
        _store_model(cache / key, res["files"])
        trained.append(key)
        log(f"  [{i}/{len(jobs)}] {what}: trained in {res['seconds']:.1f} s")
    return errors


def _cells(plan: Plan, todo, out: Path, cache: Path, backend, model_errors: dict[str, str], ran: list,
           failed: dict, log) -> None:
    shared: dict[str, Any] = {}
    jobs = []
    by_id = {c.id: c for c in todo}
    for c in todo:
        recipe = plan.models[c.model_key]
        source = Path(recipe["folder"]) if "folder" in recipe else cache / c.model_key
        if c.model_key in model_errors:
            _record(out, c, {"error": f"training its model failed: {model_errors[c.model_key]}"}, ran, failed, log,
                    "-")
            continue
        if c.model_key not in shared:
            shared[c.model_key] = backend.share(pack(source))
        task = {**dataclasses.asdict(c), "model_source": str(source)}
        jobs.append((c.id, cell_task, (task, shared[c.model_key]), c.device != "cpu"))
    for i, (cid, res) in enumerate(backend.run(jobs), 1):
        _record(out, by_id[cid], res, ran, failed, log, f"{i}/{len(jobs)}")


def _record(out: Path, c, res: dict, ran: list, failed: dict, log, progress: str) -> None:
    """A finished cell's folder (built beside itself, renamed into place), or its one-line error."""
    folder, fail = cell_paths(out, c.id)
    ran.append(c.id)
    if "error" in res:
        failed[c.id] = res["error"]
        write_json(fail, {"cell": c.id, "coords": c.coords, "error": res["error"]})
        log(f"  [{progress}] {c.id}: failed: {res['error']}")
        return
    with fresh_folder(folder) as tmp:
        unpack(res["files"], tmp / "run")
        write_json(tmp / "cell.json", {"cell": c.id, "coords": c.coords, "row": res["row"],
                                       "seconds": res["seconds"], "repair_seconds": res["repair_seconds"]})
    fail.unlink(missing_ok=True)
    log(f"  [{progress}] {c.id}: done in {res['seconds']:.1f} s")


def _finish(plan: Plan, out: Path) -> None:
    """Rebuild results.csv / .md, timings.csv and report.html from the cell folders on disk."""
    from ..report.html import write_report

    rows, timings, folders, skipped = [], [], [], {}
    for r in read_cells(out, plan):
        if r.status == "ok":
            rows.append({"cell": r.id, **r.coords, "status": "ok", **r.row})
            timings.append({"cell": r.id, "seconds": r.seconds, "repair_seconds": r.repair_seconds})
            folders.append(r.run)
        elif r.status == "failed":
            rows.append({"cell": r.id, **r.coords, "status": "failed", "error": r.error})
            skipped[r.id] = r.error
    keys = [k for k in plan.cells[0].coords if k != "seed"]
    title = plan.grid.title or f"netmend bench {plan.path.name}"
    write_tables(out, title, keys, rows, timings)
    if folders:
        write_report(folders, out / "report.html", title, skipped=skipped,
                     extra={"command": f"netmend bench {plan.path.name} --out {out}"})
