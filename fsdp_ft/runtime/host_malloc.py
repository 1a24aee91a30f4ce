"""glibc malloc settings for training on the host: big buffers reused every step stay in the heap.

By default glibc gives each allocation above a sliding threshold (128 KiB, rising to at most 32 MiB) its own
mmap and unmaps it on free, and hands freed heap tops back to the OS. A training step allocates and frees the
same activations, gradients and communication buffers every micro-batch, so on CPU each comes back as fresh
pages that the kernel must fault in and zero again. Fixing the threshold at its 32 MiB maximum and never trimming
keeps those pages in the process; the peak RSS barely moves, because the step's high-water mark is reached
either way. The effect on steps is measured in docs/performance.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB, more than any step frees at the heap top at once

_done: str | None = None


def tune() -> str:
    """Apply the settings once per process; returns what was done (for the run's setup row)."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


@functools.cache
def _glibc():
    """The C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_free() -> None:
    """Hand the heap's free pages back to the OS now (glibc's malloc_trim). For one-off phases such as loading:
    whole weights read, quantized and dropped, between the small tensors that stay, leave free holes that no
    trimming at the heap's top returns, and they would count in the peak RSS of the whole run."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def _apply() -> str:
    libc = _glibc()
    if libc is None:
        return "default (not glibc)"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "default (mallopt refused)"
    return f"glibc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
