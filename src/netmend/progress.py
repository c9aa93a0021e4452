"""Progress bars (rich) that stay quiet when output is not a terminal or NETMEND_QUIET is set."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class _Bar:
    def __init__(self, prog, task):
        self._prog, self._task = prog, task

    def advance(self, n: int = 1) -> None:
        if self._prog is not None:
            self._prog.advance(self._task, n)


@contextmanager
def progress(desc: str, total: int | None = None):
    if os.environ.get("NETMEND_QUIET") or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        yield _Bar(prog, prog.add_task(desc, total=total))
