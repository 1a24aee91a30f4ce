"""FSDP2's gradient reduce-scatter on CPU ranks (gloo), without gloo's emulation costs.

Gloo has no reduce-scatter of its own: torch's gloo `_reduce_scatter_base` copies the whole input and
all-reduces the copy, and FSDP2 calls it synchronously, so every block's backward stops until that block's
gradients are reduced (measured at 2 ranks, bf16 on a 2-core Xeon: 1.4 s of a 6 s step in FSDP's post-backward).
Here FSDP's own input buffer, which FSDP never reads again, is all-reduced in place and asynchronously, and the
next block's backward runs meanwhile. This rank's part is copied into FSDP's output only when it is needed:
when more than `max_in_flight` reductions are pending (which bounds the extra memory to that many unsharded
block gradients), and at the end of backward (an autograd final callback), before anything reads a gradient.

Deferring is only correct when FSDP does not read its output between the reduce-scatter and the end of
backward; `asynchronous=False` (per FSDP module) covers the cases where it does (a cast of the reduced gradient
to another parameter dtype), keeping the no-copy in-place all-reduce but waiting at once.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

MAX_IN_FLIGHT = 2


class PendingReductions:
    """The in-flight all-reduces of one model, finished in the order they were issued (FIFO, like the ranks)."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT):
        self.max_in_flight = max_in_flight
        self.queue: deque = deque()
        self._callback_queued = False

    def add(self, work, flat: torch.Tensor, output: torch.Tensor, rank: int, world: int, average: bool,
            asynchronous: bool) -> None:
        self.queue.append((work, flat, output, rank, world, average))
        if not asynchronous:
            self.flush()
            return
        self._flush_at_end_of_backward()
        while len(self.queue) > self.max_in_flight:
            self._finish_oldest()

    def flush(self) -> None:
        """Wait for every pending reduction and fill its output."""
        self._callback_queued = False
        while self.queue:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        work, flat, output, rank, world, average = self.queue.popleft()
        work.wait()
        mine = flat.view(world, -1)[rank]
        if average:
            torch.div(mine, world, out=output)
        else:
            output.copy_(mine)

    def _flush_at_end_of_backward(self) -> None:
        if self._callback_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self._callback_queued = True
        except RuntimeError:  # not inside a backward pass: nothing would flush later, so finish now
            self.flush()


class GlooReduceScatter(ReduceScatter):
    """A `ReduceScatter` for `FSDPModule.set_custom_reduce_scatter`: in-place all-reduce, finished later."""

    def __init__(self, pending: PendingReductions, asynchronous: bool = True):
        self.pending, self.asynchronous = pending, asynchronous

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False):
        average = op == dist.ReduceOp.AVG
        if not average and op != dist.ReduceOp.SUM:  # e.g. a pre-multiplied sum: torch's own path
            self.pending.flush()
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        work = dist.all_reduce(input_tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
        self.pending.add(work, input_tensor, output_tensor, group.rank(), group.size(), average,
                         self.asynchronous and not async_op)
        return None


def install(model: torch.nn.Module, fsdp_modules, reduce_dtype: torch.dtype) -> bool:
    """Give each FSDP module the gloo reduce-scatter, sharing one queue; returns whether reductions are deferred.
    They are not when trainable parameters are stored in a dtype other than the reduce dtype: FSDP casts the
    reduced gradient right after the call, so it must be there."""
    pending = PendingReductions()
    asynchronous = {p.dtype for p in model.parameters() if p.requires_grad} <= {reduce_dtype}
    for module in fsdp_modules:
        module.set_custom_reduce_scatter(GlooReduceScatter(pending, asynchronous))
    return asynchronous


def applies(mesh, cfg) -> bool:
    """Only for a 1-D gloo mesh of several ranks, without CPU offload (whose grads FSDP copies at once)."""
    if not cfg.fsdp.gloo_async_reduce or mesh.ndim != 1 or mesh.size() == 1 or cfg.fsdp.cpu_offload:
        return False
    return dist.get_backend(mesh.get_group()) == "gloo"
