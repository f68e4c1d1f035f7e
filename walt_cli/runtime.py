"""Process-wide settings the `walt` command applies before it runs a subcommand.

CPU memory: PyTorch's CPU allocator is the C library's malloc, with no cache of its own (unlike
its CUDA allocator). glibc's malloc serves every block above its mmap threshold (dynamic, at
most 32 MiB on 64-bit Linux) with a fresh anonymous mapping and unmaps it on free, and it hands
the top of its heap back to the kernel once more than the trim threshold is free. A training
step allocates and frees activations of tens to hundreds of MiB each time, so every step
page-faults them in again and the kernel zeroes every page: on the 2-core development machine
this took a quarter to a third of the tiny tokenizer's training step (BENCHMARKS.md, "CPU memory
allocator"). Raising both thresholds makes malloc keep and reuse the freed memory, as the
caching allocators (jemalloc, tcmalloc) PyTorch's performance tuning guide recommends for CPUs
do. Those come from system packages and take effect only through LD_PRELOAD, set before the
process starts, so walt calls glibc's own `mallopt` instead. The cost: the process keeps its peak memory once reached (the
resident set no longer shrinks between steps).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

ALLOCATOR_ENV = "WALT_CPU_ALLOCATOR"  # "keep" (the default) or "system" (leave glibc's defaults)
_KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the reusable heap instead of fresh mappings


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (see the module docstring). Returns True
    where it was applied; False on another C library or OS, or with WALT_CPU_ALLOCATOR=system.
    Applies to allocations made after the call; safe to call more than once."""
    choice = os.environ.get(ALLOCATOR_ENV, "keep").strip().lower()
    if choice not in ("keep", "system"):
        from walt_cli.errors import WaltError

        raise WaltError(f"{ALLOCATOR_ENV} must be keep or system, got {choice!r}")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the running process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both thresholds: with the mmap one alone raised, freed blocks at the top of the heap would
    # still go back to the kernel (setting either turns off glibc's adjustment of both).
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    mapped = mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1
    return trimmed and mapped


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: AMX tiles (Intel's Sapphire Rapids
    and later) or AVX512-BF16's dot-product instructions (AMD's Zen 4 and later, Intel's
    Cooper Lake). There bf16 autocast trains faster than fp32 (1.4-2.2x: BENCHMARKS.md, "bf16
    on the CPU"); on a CPU without either, bf16 matrix multiplies are emulated and slower. Read
    from PyTorch's private CPU-feature probes; False where they are missing or fail."""
    import torch

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False
