"""glibc malloc settings for training on the host: big buffers reused every step stay in the heap.

By default glibc gives each allocation above a sliding threshold (128 KiB, rising to at most 32 MiB) its own
mmap and unmaps it on free, and hands freed heap tops back to the OS. A training step allocates and frees the
same activations, gradients and communication buffers every micro-batch, so on CPU each comes back as fresh
pages that the kernel must fault in and zero again. Fixing the threshold at its 32 MiB maximum and never trimming
keeps those pages in the process; the peak RSS barely moves, because the step's high-water mark is reached
either way.

Buffers above 32 MiB (a 512-token row's fp32 logits at a 49k vocabulary are 100 MB) are still mmapped fresh each
time, and on a VM each 4 KiB page fault costs about a microsecond and a half: allocating and filling 100 MB took
44 ms against 3.4 ms to refill it. glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35+) asks the kernel for
transparent huge pages on those mappings (where THP is `madvise` or `always`), 512 times fewer faults: 6.6 ms.
Tunables are read only when a process starts, so `fsdp-ft train` restarts itself with it before importing torch
(`hugepage_env`), `fsdp-ft run` puts it in the ranks' environment and `fsdp-ft submit` in the batch
script. The effect on steps is measured in
docs/performance.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB, more than any step frees at the heap top at once
HUGETLB = "glibc.malloc.hugetlb=1"  # transparent huge pages for malloc's mmaps and heap (glibc >= 2.35)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_done: str | None = None


def tune() -> str:
    """Apply the settings once per process; returns what was done (for the run's setup row)."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


def _apply() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "default (mallopt refused)"
    done = f"glibc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    if HUGETLB in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        done += f", huge pages ({HUGETLB}, THP {thp_mode()})"
    return done


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode: always, madvise, never (or unknown)."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "unknown"


def hugepage_env(environ=None) -> dict | None:
    """`environ` (default: this process's) with glibc's huge-page tunable added; None where it is set already
    or cannot act (not glibc 2.35+, or THP off)."""
    environ = dict(os.environ if environ is None else environ)
    if platform.system() != "Linux":
        return None
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35) or thp_mode() == "never":
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        return None  # the user's own choice stands
    environ["GLIBC_TUNABLES"] = ":".join([*tunables, HUGETLB])
    return environ


def shell_export() -> str:
    """The batch-script line that adds the tunable to whatever GLIBC_TUNABLES the node has (SLURM jobs)."""
    return f'export GLIBC_TUNABLES="${{GLIBC_TUNABLES:+$GLIBC_TUNABLES:}}{HUGETLB}"'
