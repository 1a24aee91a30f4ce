"""FSDP2's gradient reduce-scatter on CPU ranks (gloo), without gloo's emulation costs.

Gloo has no reduce-scatter of its own: torch's gloo `_reduce_scatter_base` copies the whole input and
all-reduces the copy, and FSDP2 calls it synchronously, so every block's backward stops until that block's
gradients are reduced (measured at 2 ranks, bf16 on a 2-core Xeon: 1.4 s of a 6 s step in FSDP's post-backward).
Here FSDP's own input buffer, which FSDP never reads again, is reduced without a copy and asynchronously (two
ranks swap the halves the other keeps; more ranks all-reduce it in place), and the next block's backward runs
meanwhile. This rank's part is copied into FSDP's output only when it is needed:
when more than `max_in_flight` reductions are pending (which bounds the extra memory to that many unsharded
block gradients), and at the end of backward (an autograd final callback), before anything reads a gradient.

With two ranks the swapped halves travel in the gradients' own dtype (bf16 under bf16 mixed precision) and are
summed into the fp32 output: FSDP's copy-in writes half the bytes and the exchange sends half the bytes, and the
sum is the same fp32 sum of the same two values as an fp32 reduce, bit for bit (every bf16 or fp16 value is exact
in fp32).

Deferring is only correct when FSDP does not read its output between the reduce-scatter and the end of
backward; `asynchronous=False` (per FSDP module) covers the cases where it does (a cast of the reduced gradient
to another parameter dtype), keeping the no-copy in-place all-reduce but waiting at once.

Where every rank holds every weight (a replicas x 1 mesh), FSDP's own HSDP all-reduce blocks the same way;
`DeferredAllReduce` replaces it with an asynchronous all-reduce finished through the same queue.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from fsdp_ft.parallel.host_buffers import BufferPool

MAX_IN_FLIGHT = 2
ALL_GATHER_TAGS = 1 << 20  # message tags of all-gather exchanges start here; reductions' stay below
# Below this a 2-rank all-gather goes through torch's gloo all-gather: its two temporaries cost little there, and
# the two point-to-point ops per block cost more (configs/tiny.yaml, 2 ranks: ~1 s of a 16 s run)
SWAP_MIN_BYTES = 1 << 20
# widening sums run in pieces of this many elements: torch's CPU add of a bf16 tensor into an fp32 one first
# copies the whole input to fp32; per piece that copy stays in cache (14M elements: 25.4 -> 5.7 ms)
WIDEN_PIECE = 1 << 16


def swap_with_peer(send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup, tag: int) -> list:
    """Two ranks: send `send` to the other rank and receive its part into `recv`, asynchronously."""
    peer = dist.get_global_rank(group, 1 - group.rank())
    return [dist.isend(send, peer, group=group, tag=tag), dist.irecv(recv, peer, group=group, tag=tag)]


class PendingReductions:
    """The in-flight reductions of one model, finished in the order they were issued (FIFO, like the ranks)."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT):
        self.max_in_flight = max_in_flight
        self.queue: deque = deque()
        self.issued = 0  # message tag of the next exchange: every rank issues the same sequence
        self.all_gathers = 0  # the same for the all-gathers, in their own tag range
        self._callback_queued = False

    def add(self, works: list, finish, asynchronous: bool) -> None:
        """`finish()` fills the output once every one of `works` is done."""
        self.issued += 1
        self.queue.append((works, finish))
        if not asynchronous:
            self.flush()
            return
        self._flush_at_end_of_backward()
        while len(self.queue) > self.max_in_flight:
            self._finish_oldest()

    def next_all_gather_tag(self) -> int:
        self.all_gathers += 1
        return self.all_gathers % ALL_GATHER_TAGS

    def flush(self) -> None:
        """Wait for every pending reduction and fill its output."""
        self._callback_queued = False
        while self.queue:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        works, finish = self.queue.popleft()
        for work in works:
            work.wait()
        finish()

    def _flush_at_end_of_backward(self) -> None:
        if self._callback_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self._callback_queued = True
        except RuntimeError:  # not inside a backward pass: nothing would flush later, so finish now
            self.flush()


class GlooReduceScatter(ReduceScatter):
    """A `ReduceScatter` for `FSDPModule.set_custom_reduce_scatter`, finished later (see PendingReductions).

    Two ranks swap halves (each sends the half the other keeps: half the bytes of an all-reduce, measured 16.5
    vs 27 ms for 28 MB, and 50 ms through torch's gloo reduce-scatter); more ranks all-reduce the buffer in place.
    """

    def __init__(self, pending: PendingReductions, asynchronous: bool = True,
                 input_dtype: torch.dtype | None = None, pool: BufferPool | None = None):
        self.pending, self.asynchronous, self.pool = pending, asynchronous, pool or BufferPool()
        self.input_dtype = input_dtype  # two ranks: the gradients' dtype, when narrower than the reduce dtype
        self._next_is_input = True

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """FSDP allocates the input (every rank's gradients), then the output (this rank's part), per call."""
        is_input, self._next_is_input = self._next_is_input, not self._next_is_input
        if is_input and self.input_dtype is not None:
            dtype = self.input_dtype
        return self.pool.get(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False):
        average = op == dist.ReduceOp.AVG
        if not average and op != dist.ReduceOp.SUM:  # e.g. a pre-multiplied sum: torch's own path
            self.pending.flush()
            input_tensor = input_tensor.to(output_tensor.dtype)
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        rank, world = group.rank(), group.size()
        chunks = input_tensor.view(world, -1)
        if world == 2:
            received = self.pool.get(chunks[rank].shape, chunks.dtype, chunks.device)
            works = swap_with_peer(chunks[1 - rank], received, group, self.pending.issued % ALL_GATHER_TAGS)

            def finish():
                if input_tensor.dtype == output_tensor.dtype:
                    torch.add(chunks[rank], received, out=output_tensor)
                else:  # widen first: an add of two bf16 tensors would round the sum to bf16
                    widening_sum(chunks[rank], received, output_tensor)
                if average:
                    output_tensor.div_(world)
        else:
            works = [dist.all_reduce(input_tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)]

            def finish():
                if average:
                    torch.div(chunks[rank], world, out=output_tensor)
                else:
                    output_tensor.copy_(chunks[rank])
        self.pending.add(works, finish, self.asynchronous and not async_op)
        return None


def widening_sum(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a + b summed in out's (wider) dtype, piece by piece (see WIDEN_PIECE)."""
    a, b, flat = a.reshape(-1), b.reshape(-1), out.view(-1)
    for start in range(0, flat.numel(), WIDEN_PIECE):
        piece = slice(start, start + WIDEN_PIECE)
        flat[piece].copy_(a[piece]).add_(b[piece])


class _PairWork(dist.distributed_c10d.Work):
    """The send and the receive of a 2-rank exchange as one Work, which FSDP waits on like its own."""

    def __init__(self, works: list):
        super().__init__()
        self.works = works

    def wait(self, timeout=None) -> bool:
        for work in self.works:
            work.wait()
        self.works = []
        return True


# torch 2.13 renamed all_gather_into_tensor and warns on the old name in every rank
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PooledAllGather(AllGather):
    """FSDP's all-gather into a reused flat buffer (fsdp_ft.parallel.host_buffers). Two ranks swap their parts straight
    into it when it holds at least `swap_min_bytes` (gloo's all-gather allocates and copies two temporaries of the
    whole buffer); smaller buffers and more ranks use torch's. `swaps` counts the swapped all-gathers."""

    def __init__(self, pool: BufferPool, exchanges: PendingReductions, swap_min_bytes: int = SWAP_MIN_BYTES):
        self.pool, self.exchanges, self.swap_min_bytes = pool, exchanges, swap_min_bytes
        self.swaps = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.pool.get(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False):
        rank, world = group.rank(), group.size()
        if world != 2 or output_tensor.nbytes < self.swap_min_bytes:
            return _ALL_GATHER(output_tensor, input_tensor, group=group, async_op=async_op)
        self.swaps += 1
        chunks = output_tensor.view(world, -1)
        if input_tensor.data_ptr() != chunks[rank].data_ptr():  # FSDP copies its input into place already
            chunks[rank].copy_(input_tensor.view(-1))
        tag = ALL_GATHER_TAGS + self.exchanges.next_all_gather_tag()
        work = _PairWork(swap_with_peer(chunks[rank], chunks[1 - rank], group, tag))
        if async_op:
            return work
        work.wait()
        return None


def _deferrable(model: torch.nn.Module, policy) -> bool:
    """Reductions may finish later only when FSDP does not cast the reduced gradient at once: every trainable
    parameter is stored in the reduce dtype."""
    return {p.dtype for p in model.parameters() if p.requires_grad} <= {policy.reduce_dtype}


def install(model: torch.nn.Module, fsdp_modules, policy, world: int) -> tuple[bool, torch.dtype]:
    """Give each FSDP module the gloo reduce-scatter and the pooled all-gather, sharing one queue and one buffer
    pool; returns whether reductions are deferred and the dtype gradients travel in. They are not deferred when
    trainable parameters are stored in a dtype other than the reduce dtype: FSDP casts the reduced gradient right
    after the call, so it must be there."""
    pending = PendingReductions()
    asynchronous = _deferrable(model, policy)
    input_dtype = None
    narrower = policy.param_dtype is not None and policy.param_dtype.itemsize < policy.reduce_dtype.itemsize
    if world == 2 and narrower and policy.param_dtype.is_floating_point and policy.reduce_dtype == torch.float32:
        input_dtype = policy.param_dtype
    pool = BufferPool()  # one for the model: its blocks' buffers have the same sizes
    for module in fsdp_modules:
        module.set_custom_reduce_scatter(GlooReduceScatter(pending, asynchronous, input_dtype, pool))
        module.set_custom_all_gather(PooledAllGather(pool, pending, SWAP_MIN_BYTES))
    return asynchronous, input_dtype or policy.reduce_dtype


class DeferredAllReduce:
    """An `FSDPModule.set_all_reduce_hook` for weights every rank holds whole (replicas x 1 shard).

    FSDP2's own HSDP all-reduce is blocking on CPU ranks: every block's backward waits for it, and so for the
    slowest rank, 31 times a step (240 ms of a 2.8 s LoRA step on SmolLM2-135M's shape, in FSDP's
    post_backward_reduce). FSDP runs on the size-1 shard mesh instead, where its reduce is a copy and the hook gets
    the reduced buffer, which the sharded gradients are views of; the hook all-reduces that buffer asynchronously
    over the replicate group and divides it by the replica count once it is done (PendingReductions).
    """

    def __init__(self, pending: PendingReductions, group: dist.ProcessGroup, asynchronous: bool):
        self.pending, self.group, self.asynchronous = pending, group, asynchronous

    def __call__(self, output: torch.Tensor) -> None:
        work = dist.all_reduce(output, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        replicas = self.group.size()
        self.pending.add([work], lambda: output.div_(replicas), self.asynchronous)


def install_replicated(model: torch.nn.Module, fsdp_modules, policy, group: dist.ProcessGroup) -> bool:
    """Give each FSDP module (sharded over a size-1 mesh) the deferred all-reduce over `group`; returns whether
    the reductions are deferred (as in `install`). They all may be in flight at once: they use no extra buffer."""
    pending = PendingReductions(max_in_flight=len(fsdp_modules))
    asynchronous = _deferrable(model, policy)
    for module in fsdp_modules:
        module.set_all_reduce_hook(DeferredAllReduce(pending, group, asynchronous))
    return asynchronous


def replicate_group(mesh, cfg) -> dist.ProcessGroup | None:
    """The replicate dimension's group of a (replicas x 1) mesh whose ranks talk over gloo, when
    fsdp.gloo_async_reduce is on: FSDP then shards over the size-1 dimension and `install_replicated` reduces."""
    if mesh.ndim != 2 or mesh["shard"].size() != 1 or not _switched_on(cfg):
        return None
    group = mesh["replicate"].get_group()
    return group if dist.get_backend(group) == "gloo" else None


def enabled_for(cfg, replicas: int, shards: int) -> bool:
    """What the config decides: only a 1-D mesh (no replicas) of several ranks, without CPU offload (whose grads
    FSDP copies at once). The planner asks this too, for the buffers the pool holds."""
    return _switched_on(cfg) and replicas == 1 and shards > 1


def _switched_on(cfg) -> bool:
    return cfg.fsdp.gloo_async_reduce and not cfg.fsdp.cpu_offload


def applies(mesh, cfg) -> bool:
    """`enabled_for` this mesh, and its ranks talk over gloo."""
    if mesh.ndim != 1 or not enabled_for(cfg, 1, mesh.size()):
        return False
    return dist.get_backend(mesh.get_group()) == "gloo"
