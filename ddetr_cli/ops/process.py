"""Process-wide CPU settings the ``ddetr`` command makes before torch loads (no torch import here).

* **OpenMP wait policy PASSIVE.** OpenMP threads that finish a parallel region spin-wait for the
  next one by default. On a CPU that other work shares (a labeler's laptop, a CI runner, a camera
  box) a spinning thread holds the core the straggler needs, and every one of a forward pass's
  hundreds of regions waits for the scheduler: the demo model ran 3-8x slower on a loaded 2-core
  VM. Sleeping threads cost a wake-up per region instead. OpenMP reads it once, when torch loads it.
* **Large tensors on transparent huge pages** (torch's ``THP_MEM_ALLOC_ENABLE``: allocations of
  2 MB and more aligned to 2 MB and ``madvise(MADV_HUGEPAGE)``), and **glibc's malloc keeping freed
  memory** (``mallopt``: blocks up to 32 MB from the heap, which is trimmed only past 1 GiB free).
  An 800x1066 forward pass allocates ~1 GB of short-lived activations (the encoder's 17,821 x 1024
  FFN hidden alone is 73 MB, six times); by default glibc maps each large block fresh and unmaps
  it on free, so every pass took ~250,000 page faults, each zeroing a 4 KB page: 0.3-0.7 s of a
  3-4 s pass on the 2-core AVX2 EPYC. With both, a pass takes a few thousand faults.

A user's own setting wins: ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``, ``THP_MEM_ALLOC_ENABLE``, and
any ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` entry of malloc leave the matching setting alone.
Library users (``Detector`` in their own process) can call :func:`configure` first themselves.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed: bigger blocks are always mapped
TRIM_THRESHOLD = 1 << 30

_malloc_tuned: bool | None = None  # None: configure() has not run in this process


def _user_tuned_malloc() -> bool:
    return any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")


def _tune_glibc_malloc() -> bool:
    """mallopt the heap thresholds; False where this is not glibc or it refused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                            TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def configure() -> None:
    """Make the settings above (once per process; call before torch allocates, ideally before
    it is imported)."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _malloc_tuned = False if _user_tuned_malloc() else _tune_glibc_malloc()


def describe() -> dict[str, str]:
    """What this process runs with (for ``ddetr info``)."""
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    if _malloc_tuned:
        malloc = f"glibc, freed memory kept (heap up to {MMAP_THRESHOLD >> 20} MB blocks, trimmed past {TRIM_THRESHOLD >> 30} GiB)"
    elif _malloc_tuned is None:
        malloc = "default (ddetr's settings not applied in this process)"
    else:
        malloc = "default (" + ("the user's MALLOC_* / GLIBC_TUNABLES" if _user_tuned_malloc() else "not glibc") + ")"
    return {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP's default: spin, then sleep)"),
        "cpu_huge_pages": "tensors >= 2 MB on transparent huge pages" if thp in ("1", "true", "True", "ON", "on")
        else "off (THP_MEM_ALLOC_ENABLE is not 1)",
        "cpu_malloc": malloc,
    }
