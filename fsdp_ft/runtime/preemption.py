"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2: every rank agrees on the step, saves a checkpoint, and stops.

SLURM sends a signal before a time limit (`--signal`), on preemption and on `scontrol requeue`; torchrun forwards
signals to its workers. A signal can reach ranks at different moments, or only some ranks, and a checkpoint is a
collective, so the handler only records the signal. The trainer asks `should_stop()` once per step: a MAX
all-reduce of the recorded signal, so all ranks stop after the same step. Not installed: no collective, no cost.
"""
from __future__ import annotations

import signal

from fsdp_ft.runtime.distributed import max_over_ranks

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_installed = False
_received = 0   # the first stop signal this rank got (0: none)
_agreed = 0     # the signal all ranks agreed to stop on (0: not stopping)


def _record(signum, frame) -> None:
    global _received
    if not _received:
        _received = int(signum)


def install(signals=STOP_SIGNALS) -> dict:
    """Record (instead of die on) these signals; returns the handlers they replace. Call it on every rank."""
    global _installed, _received, _agreed
    _installed, _received, _agreed = True, 0, 0
    return {sig: signal.signal(sig, _record) for sig in signals}


def uninstall(previous: dict) -> None:
    global _installed
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _installed = False


def should_stop() -> bool:
    """True on every rank once any rank has received a stop signal (one tiny all-reduce per call)."""
    global _agreed
    if not _installed:
        return False
    if _agreed:
        return True
    _agreed = max_over_ranks(_received)
    return bool(_agreed)


def stop_signal() -> int:
    """The signal training stopped on (0: it ran to the end). Launchers turn it into 128 + signal or a requeue."""
    return _agreed
