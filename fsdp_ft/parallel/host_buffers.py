"""Reused host buffers for FSDP2's per-block communication on CPU ranks.

Every step FSDP allocates, for each block, a flat all-gather buffer and the reduce-scatter's input and output,
megabytes each and of the same few sizes every step. From glibc's heap, interleaved with the step's smaller
activations, they fragment it: on a 2-rank bf16 full fine-tune of a 135M-parameter Llama the heap grew to 2.3 GB
around 1.5 GB of live tensors (docs/performance.md). Handing out the same buffers again keeps them out of the heap.
"""
from __future__ import annotations

import math

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class BufferPool:
    """Flat buffers by (numel, dtype, device), each handed out again once nothing else holds its memory.

    A buffer is handed out as a view, so every tensor that still uses its storage (FSDP's views, gradients, a
    pending send) counts on the storage; it is free when the count is back to the pool's own."""

    def __init__(self):
        self._buffers: dict[tuple, list[tuple[torch.Tensor, StorageWeakRef, int]]] = {}

    def get(self, size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(int(s) for s in size)
        entries = self._buffers.setdefault((numel, dtype, torch.device(device)), [])
        for buffer, ref, own_count in entries:
            if torch._C._storage_Use_Count(ref.cdata) <= own_count:
                return buffer.view(size)
        buffer = torch.empty(numel, dtype=dtype, device=device)
        ref = StorageWeakRef(buffer.untyped_storage())
        entries.append((buffer, ref, torch._C._storage_Use_Count(ref.cdata)))
        return buffer.view(size)

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for entries in self._buffers.values() for b, _, _ in entries)
