"""What this CPU is and which reduced-precision math it has (for ``ddetr info``, ``--half`` on CPU
and the benchmarks' headers)."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# the instruction-set flags that decide the speed of our kernels, in /proc/cpuinfo's spelling
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    name: str  # model name, e.g. "AMD EPYC 7B13" or "Intel(R) Xeon(R) Platinum 8488C"
    flags: tuple[str, ...]  # the SPEED_FLAGS it has
    cores: int  # logical CPUs this process may run on

    @property
    def summary(self) -> str:
        """e.g. ``AMD EPYC 7B13 (avx2, fma; 2 cores)``."""
        return f"{self.name} ({', '.join(self.flags) or 'no AVX2'}; {self.cores} cores)"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.processor(), platform.machine()):
                    name = val.strip()
                elif key == "flags":
                    flags = set(val.split())
                    break
    except OSError:  # not Linux: ask torch what it can tell
        flags = {f for f, probe in (("avx2", "_is_avx2_supported"), ("avx512f", "_is_avx512_supported"),
                                    ("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported"))
                 if getattr(torch.cpu, probe, lambda: False)()}
    return CpuInfo(name=name, flags=tuple(f for f in SPEED_FLAGS if f in flags), cores=available_cores())


def available_cores() -> int:
    """Logical CPUs this process may use (its affinity mask, which container limits narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def bf16_support() -> tuple[bool, str]:
    """(whether bfloat16 inference is faster than float32 on this CPU, a phrase saying why).

    Faster where the CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16) and torch's
    oneDNN has kernels for it; elsewhere bfloat16 is emulated and slower than float32 (measured
    ~10x on a 256x1024 linear on an AVX2 EPYC)."""
    flags = set(cpu_info().flags)
    native = "AMX" if {"amx_tile", "amx_bf16"} <= flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    if native is None:
        have = "AVX-512 without BF16" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
        return False, f"no native bfloat16 ({have})"
    if not _onednn_bf16():
        return False, f"{native}, but this torch build's oneDNN has no bfloat16 kernels"
    return True, f"{native} bfloat16 (oneDNN)"
