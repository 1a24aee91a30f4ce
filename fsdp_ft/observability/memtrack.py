"""`train.track_memory`: the peak of live tensor bytes per rank, counted storage by storage.

On a GPU `torch.cuda.max_memory_allocated` answers this; on CPU the process RSS mixes tensors with the Python
heap, libraries and allocator caching, which swamps small models. torch's `MemTracker` (a dispatch mode that
follows every tensor storage from allocation to release) gives the CPU the same number — the one `fsdp-ft plan`
predicts. It slows each step, so it is off unless asked for.

`storage_bytes` counts what a set of tensors really holds, walking tensor subclasses down to their storages (a
DTensor's local shard, the codes and scales inside a quantized weight): `fsdp-ft plan` adds with it the weights
that FSDP leaves unmanaged, which torch's FSDPMemTracker never sees.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind `t`: a plain tensor's own; a wrapper subclass (DTensor, NF4Tensor, Int8Weight) holds
    none itself, so its inner tensors are walked through `__tensor_flatten__` (non-tensor entries such as a
    DTensor's mesh are skipped). A view counts its whole storage: that is what stays allocated."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    todo, out = [t], []
    while todo:
        x = todo.pop()
        if is_traceable_wrapper_subclass(x):
            todo += [v for name in x.__tensor_flatten__()[0] if isinstance(v := getattr(x, name), torch.Tensor)]
        else:
            out.append(x.untyped_storage())
    return out


def storage_bytes(tensors: Iterable[torch.Tensor], skip: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage shared by several counts once), leaving out
    every storage also behind a tensor of `skip`."""
    skipped = {st._cdata for t in skip for st in storages(t)}
    seen: dict[int, int] = {}
    for t in tensors:
        for st in storages(t):
            if st._cdata not in skipped:
                seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def _tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        """MemTracker over many steps: per-module statistics (unused here) restart at each root forward, which
        MemTracker otherwise refuses ("multiple iterative calls"); the global peak is kept."""

        def _pre_fw_hook(self, module, inputs):
            outer = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
            if not self._mod_tracker.is_bw and outer <= {"Global"}:  # a new top-level call
                self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # its gradient hooks (for labelling gradients) fail on frozen parameters; gradients are still counted,
            # as the tensors the backward ops create
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return StepTracker()


class TensorMemory:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.tracker = _tracker()
        self.tracker.track_external(model, optimizer)

    def peak_bytes(self) -> int:
        """Highest total of live tensor bytes so far, over all devices of this rank."""
        snap = self.tracker.get_tracker_snapshot("peak")
        return int(sum(dev.get("Total", 0) for dev in snap.values()))

    def peak_by_kind(self) -> dict[str, int]:
        """The same peak split by what the bytes were (parameters, gradients, optimizer state, activations ...)."""
        out: dict[str, int] = {}
        for dev in self.tracker.get_tracker_snapshot("peak").values():
            for k, v in dev.items():
                if k != "Total":
                    out[k] = out.get(k, 0) + int(v)
        return out


@contextlib.contextmanager
def tracking(enabled: bool, model, optimizer):
    """Yields a TensorMemory counting everything inside the block, or None when not enabled."""
    if not enabled:
        yield None
        return
    mem = TensorMemory(model, optimizer)
    with mem.tracker:
        yield mem
