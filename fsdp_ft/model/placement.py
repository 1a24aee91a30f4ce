"""Where every tensor of the model belongs, and an audit at the end of set-up that fails fast when one is elsewhere.

On a GPU a tensor left on the wrong device fails deep inside the first forward ("Expected all tensors to be on the
same device"), inside FSDP's lazy init, or not at all (a silent host copy every step). The audit names the first
misplaced tensor instead, before step 1. The rule (FSDP engine):
- FSDP's sharded parameters (DTensors: the DTensor, its local shard, a quantized shard's inner tensors) sit on the
  CPU under fsdp.cpu_offload (FSDP2's CPUOffloadPolicy refuses anything else at lazy init), else on the rank's
  device;
- everything FSDP leaves alone sits on the rank's device, offload or not: buffers (FSDP2 moves only non-meta
  buffers, at `fully_shard` time, and ours are meta then), the parameters it ignores (a 1-rank QLoRA base, a frozen
  base kept whole by fsdp.shard_frozen=false: FSDP2 "will not move them"), and peft's prompt token ids.
DeepSpeed: ZeRO-3 partitions (`ds_tensor`) on its offload device or the rank's device; everything else on the rank's.

A misplaced tensor is fsdp_ft's bug, not the user's: the audit raises RuntimeError (not a UserError), one line.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

CPU = torch.device("cpu")


def home(t: torch.Tensor, device: torch.device, offload: bool) -> torch.device:
    """The device tensor `t` of an FSDP-sharded model belongs on (the rule above); materialize allocates there."""
    from torch.distributed.tensor import DTensor

    return CPU if offload and isinstance(t, DTensor) else device


def _normal(device: torch.device) -> torch.device:
    """'cuda' (a wrapper subclass built with no index) means the current GPU; the CPU has no index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return CPU if device.type == "cpu" else device


def _parts(name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, holds storage) for `t` and every tensor inside it: a DTensor's local shard, a quantized
    weight's inner tensors (whatever `__tensor_flatten__` names), recursively. Wrappers are checked too: FSDP and
    torch dispatch read a wrapper's device, the kernels read its inner tensors'."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if isinstance(t, DTensor):
        yield name, t, False
        yield from _parts(f"{name} (local shard)", t._local_tensor)
    elif is_traceable_wrapper_subclass(t):
        yield name, t, False
        for inner in t.__tensor_flatten__()[0]:
            value = getattr(t, inner)
            if isinstance(value, torch.Tensor):
                yield from _parts(f"{name}.{inner}", value)
    else:
        yield name, t, True


def _audit(entries: Iterator[tuple[str, torch.Tensor, torch.device, str]]) -> int:
    """Raise on the first (name, tensor, expected device, why) whose tensor, or a tensor inside it, is elsewhere;
    return how many storage-holding tensors were checked."""
    count = 0
    for name, t, expected, why in entries:
        want = _normal(expected)
        for part, tensor, leaf in _parts(name, t):
            if _normal(tensor.device) != want:
                raise RuntimeError(f"placement audit: '{part}' is on {tensor.device}, expected {want} ({why}); this is "
                                   "a bug in fsdp_ft, not in your config: please report it with output_dir/config.yaml")
            count += leaf
    return count


def _prompt_tokens(model: nn.Module, device: torch.device):
    for adapter, ids in (getattr(model, "prompt_tokens", None) or {}).items():
        yield f"prompt_tokens[{adapter}]", ids, device, "peft's virtual token ids, fed to every forward"


def check(model: nn.Module, device: torch.device, offload: bool = False) -> int:
    """Audit a model built by the FSDP engine (sharded, materialized): every parameter, buffer, quantized inner
    tensor and prompt token id on its `home`. Returns how many tensors were checked (shared ones once)."""
    from torch.distributed.tensor import DTensor

    def entries():
        for name, p in model.named_parameters():
            sharded = isinstance(p, DTensor)
            why = ("FSDP keeps sharded parameters in host memory under fsdp.cpu_offload" if sharded and offload else
                   "an FSDP-sharded parameter" if sharded else "a parameter FSDP ignores: it never moves it")
            yield name, p, home(p, device, offload), why
        for name, b in model.named_buffers():
            yield name, b, device, "a buffer: read by the forward on the rank's device"
        yield from _prompt_tokens(model, device)
    return _audit(entries())


def check_deepspeed(model: nn.Module, device: torch.device, offload_param: bool) -> int:
    """Audit a model after `deepspeed.initialize`: ZeRO-3 partitions (`ds_tensor`) on the CPU under offload_param
    (DeepSpeed keeps them there), else on the rank's device; parameters' own data (ZeRO-3: an empty placeholder
    DeepSpeed makes on the parameter's device) and buffers on the rank's device. Returns how many were checked."""
    def entries():
        for name, p in model.named_parameters():
            yield name, p, device, "a parameter DeepSpeed computes with on the rank's device"
            part = getattr(p, "ds_tensor", None)
            if part is not None:
                yield (f"{name} (ZeRO-3 partition)", part, CPU if offload_param else device,
                       "DeepSpeed's offload_param keeps partitions in host memory" if offload_param
                       else "a ZeRO-3 partition")
        for name, b in model.named_buffers():
            yield name, b, device, "a buffer: read by the forward on the rank's device"
        yield from _prompt_tokens(model, device)
    return _audit(entries())
