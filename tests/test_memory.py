"""keep_freed_memory: glibc keeps freed blocks (no page faults for the next batch's tensor); NETMEND_MALLOC=0 opts out."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from netmend.memory import keep_freed_memory
print(keep_freed_memory())
for _ in range(3):                        # warm: the first allocations grow the heap
    torch.ones(64 * 2**20 // 4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):                       # 64 MiB tensors, above glibc's largest mmap threshold (32 MiB)
    torch.ones(64 * 2**20 // 4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert out.returncode == 0, out.stderr
    took, faults = out.stdout.split()
    return took == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_and_the_opt_out_is_honoured():
    kept, faults_kept = probe()
    left, faults_default = probe(NETMEND_MALLOC="0")
    assert kept and not left
    assert faults_default > 20 * 16384 // 2          # each 64 MiB tensor faults its 16 384 pages in anew
    assert faults_kept < faults_default / 10
