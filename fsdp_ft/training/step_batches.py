"""Each step's micro-batches, the next step's made while this one computes (`train.prefetch_batches`).

What is left of data loading per step is host work: padding prepared rows into tensors (and, for tasks that
tokenize at encode time, tokenizing them), then the copy to the device. On the main thread that work sits between
the steps' device work. Worse, on a GPU a copy from pageable host memory first waits for the device to finish
the work queued before it, so the host can never run ahead of the GPU. With prefetching one worker thread builds
the next step's batches, in pinned memory on CUDA, while this step computes, and the copies are issued
asynchronously.

Batches depend only on the data position (epoch, step in epoch), never on an iterator's state, so prefetching
changes no number and a resume needs nothing of it: a batch built for a position the run never reaches (it
stopped, or evaluated first) is dropped.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

Position = tuple[int, int]  # (epoch, step in epoch)


def enabled(setting: bool | None, device: torch.device) -> bool:
    """train.prefetch_batches; null: on for GPUs, off on CPU ranks, where a thread building batches would share
    the rank's cores with the step instead of overlapping idle device time."""
    return device.type == "cuda" if setting is None else setting


class StepBatches:
    """`get(position, next_position)`: the batches of `position` on the device, and the next step's started."""

    def __init__(self, build: Callable[[Position], list[dict]], device: torch.device, prefetch: bool):
        self.build, self.device = build, device
        self.pin = device.type == "cuda"
        self.pending: tuple[Position, Future] | None = None
        self.pool = None
        if prefetch:
            # a new thread's current CUDA device is device 0: pinning there would open a context on GPU 0
            init = (lambda: torch.cuda.set_device(device)) if self.pin else None
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsdp_ft-batches", initializer=init)

    def _host(self, position: Position) -> list[dict]:
        batches = self.build(position)
        if self.pin:
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return batches

    def get(self, position: Position, next_position: Position | None) -> list[dict]:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == position:
            host = pending[1].result()  # the worker's error, if any, is raised here
        else:
            if pending is not None:
                pending[1].exception()  # wait: never two builds at once (a task's tokenizer is not thread-safe)
            host = self._host(position)
        if self.pool is not None and next_position is not None:
            self.pending = (next_position, self.pool.submit(self._host, next_position))
        return [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in host]

    def wait(self) -> None:
        """Let the worker finish before the main thread builds other batches (evaluation) with the same task."""
        if self.pending is not None:
            self.pending[1].exception()

    def close(self) -> None:
        self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
