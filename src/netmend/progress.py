"""Progress on a terminal (rich, stderr) and through `logging` for API users.

A stage (`stage("repairing: rectify")`) is logged at INFO on the "netmend" logger when it starts and
ends; on a terminal a status line appears once the stage has run for `delay` seconds (about two),
so quick steps print nothing. Both stay quiet when stderr is not a terminal, with `--quiet`, or
when NETMEND_QUIET is set. Progress bars inside a stage update the stage's line (rich allows one
live display at a time).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("netmend")
_status = {"live": None, "label": ""}


def quiet() -> bool:
    return bool(os.environ.get("NETMEND_QUIET")) or not sys.stderr.isatty()


class _Bar:
    def __init__(self, prog=None, task=None, desc: str = "", total: int | None = None):
        self._prog, self._task, self._desc, self._total, self._done = prog, task, desc, total, 0

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._prog is not None:
            self._prog.advance(self._task, n)
        elif _status["live"] is not None:
            of = f"/{self._total}" if self._total else ""
            _status["live"].update(f"{_status['label']} · {self._desc} {self._done}{of}")


@contextmanager
def progress(desc: str, total: int | None = None):
    """A progress bar for a counted loop (inside a stage: the stage's status line counts instead)."""
    if quiet() or _status["label"]:
        yield _Bar(desc=desc, total=total)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        yield _Bar(prog, prog.add_task(desc, total=total))


@contextmanager
def stage(label: str, delay: float = 2.0):
    """Log a step of the flow; on a terminal show `label` with a spinner once it has run `delay` seconds."""
    log.info("%s ...", label)
    t0 = time.perf_counter()
    if quiet() or _status["label"]:
        try:
            yield
        finally:
            log.info("%s done (%.2f s)", label, time.perf_counter() - t0)
        return
    from rich.console import Console

    _status["label"] = label
    lock = threading.Lock()
    state = {"closed": False}

    def show():
        with lock:
            if state["closed"]:
                return
            live = Console(stderr=True).status(f"{label}")
            live.start()
            _status["live"] = live

    timer = threading.Timer(delay, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["closed"] = True
            if _status["live"] is not None:
                _status["live"].stop()
            _status["live"], _status["label"] = None, ""
        log.info("%s done (%.2f s)", label, time.perf_counter() - t0)
