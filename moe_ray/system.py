"""Process-level settings for training processes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def cache_dir() -> Path:
    """moe-ray's per-user cache: run markers, the built-in corpus. `MOE_RAY_CACHE` moves it."""
    return Path(os.environ.get("MOE_RAY_CACHE") or Path.home() / ".cache" / "moe-ray")


def package_folder() -> str:
    """This moe-ray's source folder, for Ray's `py_modules`: a cluster runs the caller's code."""
    return str(Path(__file__).parent)


def tune_cpu_allocator() -> bool:
    """Keep freed large tensors in the heap instead of returning them to the OS.

    glibc serves large allocations (128 KiB and up by default) with a fresh mmap, so each training
    step re-faults (and zeroes) the pages of its activations; on the CPU this costs ~10% of an
    MoE layer's step. Raising the thresholds lets the next step reuse the same memory, as the
    CUDA caching allocator does on GPU. Returns whether the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 << 30) == 1
    except (OSError, AttributeError):
        return False
