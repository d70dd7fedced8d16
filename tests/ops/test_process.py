"""The ``ddetr`` command's process settings (``ddetr_cli/ops/process.py``): huge pages for large
tensors and glibc's malloc keeping freed memory, so that a forward pass's large activations stop
costing a page fault per 4 KB; a user's own settings left alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# a forward pass's pattern: large activations allocated, written and freed, again and again;
# argv: mode, block size in MB, blocks a round
PROBE = """
import json, resource, sys
if sys.argv[1] == "configure":
    import ddetr_cli.__main__  # what the ddetr command runs first
import torch
from ddetr_cli.ops.process import describe
mb, count = int(sys.argv[2]), int(sys.argv[3])

def churn():
    for _ in range(8):
        ts = [torch.empty(mb << 18).fill_(1.0) for _ in range(count)]
        del ts

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, **describe()}))
"""

USER_VARS = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def probe(mode: str, mb: int = 8, count: int = 6, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in USER_VARS and not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", PROBE, mode, str(mb), str(count)], capture_output=True, text=True,
                       timeout=300, env={**base, **env})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


HEAP_PROBE = """
import ctypes, json, sys
if sys.argv[1] == "configure":
    import ddetr_cli.__main__
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
t = torch.empty(4 << 20).fill_(1.0)  # 16 MB: an encoder activation's size
print(json.dumps({"mapped_bytes": libc.mallinfo2().hblkhd}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_activations_come_from_the_heap_that_keeps_freed_memory():
    """glibc's own accounting (mallinfo2): by default a 16 MB block is mapped afresh (and its pages
    faulted in, 4 KB at a time, on every use); after the entry point's settings it comes from the
    heap, whose freed memory later blocks reuse."""
    def mapped(mode: str) -> int:
        base = {k: v for k, v in os.environ.items() if k not in USER_VARS and not k.startswith("MALLOC_")}
        r = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, timeout=300,
                           env={**base, "THP_MEM_ALLOC_ENABLE": "0"})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])["mapped_bytes"]

    assert mapped("plain") >= 16 << 20
    assert mapped("configure") < 16 << 20


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(not GLIBC or _thp_mode() == "never", reason="transparent huge pages are off in this kernel")
def test_blocks_above_the_heap_limit_go_on_huge_pages():
    """64 MB blocks are always mapped afresh (above glibc's 32 MB heap limit): 16,384 faults each
    on 4 KB pages, 32 on huge pages (more where the kernel finds no free 2 MB page at once)."""
    plain = probe("plain", mb=64, count=2)
    tuned = probe("configure", mb=64, count=2)
    assert plain["faults"] > 100_000, plain
    assert tuned["faults"] < plain["faults"] / 4, (plain, tuned)
    assert tuned["cpu_huge_pages"].startswith("tensors >= 2 MB") and plain["cpu_huge_pages"].startswith("off"), tuned


def test_user_settings_win():
    mine = probe("configure", MALLOC_ARENA_MAX="2", THP_MEM_ALLOC_ENABLE="0", OMP_WAIT_POLICY="ACTIVE")
    assert mine["cpu_malloc"] == "default (the user's MALLOC_* / GLIBC_TUNABLES)", mine
    assert mine["cpu_huge_pages"].startswith("off") and mine["omp_wait_policy"] == "ACTIVE", mine
