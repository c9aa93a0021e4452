"""Keep freed memory in the process, so that a large tensor's pages are not handed back and faulted in again.

glibc serves every allocation above 32 MiB (a batch of activations: 2 048 BlockMNIST images × 32 channels ×
56 × 28 floats is 411 MB) with a fresh `mmap` and unmaps it on free, so the next batch's tensor page-faults every
4 KiB page anew and the kernel zeroes it. On a leakage repair's IG passes that was half the time: 250 images took
7.75 s (4.0 s of it system time, 1.7 M page faults) and 3.3 s with freed memory kept (benchmarks/results/speed.md).
`keep_freed_memory()` tells glibc to serve large blocks from its heap and not to give freed heap back to the
system — what the environment variables MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ do, set from inside.

The cost: the process holds on to its peak heap until it exits, so its resident size stays near its peak. That
suits a command or a benchmark, not a long-lived host, so `netmend`'s command line, its benchmark and bench
workers call this, and the library, when imported, does not. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4     # glibc's mallopt parameters (malloc.h)
_DONE: list[bool] = []


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (module docstring); True where it took effect. NETMEND_MALLOC=0
    leaves the allocator alone."""
    if _DONE:
        return _DONE[0]
    ok = False
    if os.environ.get("NETMEND_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):                # not glibc (musl, macOS, Windows)
            mallopt = None
        if mallopt is not None:
            ok = all(mallopt(param, value) == 1 for param, value in
                     ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20)))
    _DONE.append(ok)
    return ok
