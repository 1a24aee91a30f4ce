"""QLoRA's frozen 4-bit base as torchao NF4 tensors, which FSDP2 shards correctly.

bitsandbytes' `Params4bit` under `fully_shard` trains the right step 0 and then silently diverges (accelerate
#3983, bitsandbytes #1945). torchao's `NF4Tensor` implements FSDP2's tensor-subclass all-gather hooks, so each
rank stores 1/N of the packed 4-bit data and the gathered weight is bit-identical to the unsharded one. The
format is the QLoRA one: the NF4 code book, blocks of 64 weights, and per-block scales quantized again to 8 bits
in blocks of 256 (double quantization).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError


def _nf4():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels it cannot load on CPU
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    return nf4_tensor


def is_nf4(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    return type(t).__name__ == "NF4Tensor"


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The frozen base linears under LoRA layers: what QLoRA stores in 4 bits."""
    out = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            base = module.get_base_layer()
            if isinstance(base, nn.Linear):
                out.append((name, base))
    return out


def _shard_blocks(shape: torch.Size, block_size: int, shards: int) -> list[int]:
    """4-bit blocks in each row shard FSDP makes of a weight (torch.chunk of the rows)."""
    rows, per_row = shape[0], shape.numel() // shape[0]
    step = -(-rows // shards)
    return [min(step, rows - start) * per_row // block_size for start in range(0, rows, step)]


def check_block_sizes(layers: list[tuple[str, nn.Linear]], cfg: Config, shards: int) -> None:
    """Every weight, and every rank's row shard of it, must hold whole double-quantization blocks."""
    q = cfg.finetune.quant
    counts = []
    for name, linear in layers:
        shape = linear.weight.shape
        if shape.numel() % q.block_size:
            raise ConfigError(f"finetune.method=qlora: weight '{name}' {tuple(shape)} is not a multiple of "
                              f"finetune.quant.block_size={q.block_size}; exclude it via finetune.lora.target_modules")
        counts += _shard_blocks(shape, q.block_size, shards)
    bad = [c for c in counts if c % q.scaler_block_size]
    if bad:
        common = math.gcd(*counts)
        fits = max(d for d in range(1, min(common, 256) + 1) if common % d == 0)
        raise ConfigError(f"finetune.quant.scaler_block_size={q.scaler_block_size} does not divide the 4-bit blocks of "
                          f"every weight's row shard on {shards} rank(s) (e.g. {bad[0]}); set "
                          f"finetune.quant.scaler_block_size={fits}")


def meta_nf4(shape: torch.Size, dtype: torch.dtype, block_size: int, scaler_block_size: int) -> torch.Tensor:
    """An NF4 tensor on the meta device: lets FSDP2 shard the layout before any weight is read."""
    nf4 = _nf4()
    n_blocks = shape.numel() // block_size
    meta = torch.device("meta")
    inner = {
        "quantized_data": torch.empty(shape.numel() // 2, dtype=torch.uint8, device=meta),
        "scaler_mean": torch.empty((), dtype=dtype, device=meta),
        "quantization_factor": torch.empty(n_blocks // scaler_block_size, dtype=dtype, device=meta),
        "quantized_scalers": torch.empty(n_blocks, dtype=torch.int8, device=meta),
        "nf4": torch.empty(16, dtype=dtype, device=meta),
    }
    ctx = {"block_size": block_size, "n_blocks": n_blocks, "scaler_block_size": scaler_block_size,
           "tensor_meta": nf4.SubclassTensorArgs(shape, torch.empty(shape, device=meta).stride(), 0, dtype, meta,
                                                 False)}
    return nf4.NF4Tensor.__tensor_unflatten__(inner, ctx, shape, None)


def quantize_meta_model(model: nn.Module, cfg: Config, shards: int) -> int:
    """Swap every LoRA base weight for an NF4 placeholder (before sharding over `shards` ranks); returns how many."""
    q = cfg.finetune.quant
    layers = quantized_linears(model)
    check_block_sizes(layers, cfg, shards)
    for name, linear in layers:
        linear.weight = nn.Parameter(meta_nf4(linear.weight.shape, linear.weight.dtype, q.block_size,
                                              q.scaler_block_size), requires_grad=False)
    return len(layers)


def to_nf4(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Quantize a full weight with the block sizes of the placeholder `like`."""
    return _nf4().to_nf4(full.to(like.dtype).contiguous(), like.block_size, like.scaler_block_size)


@torch.no_grad()
def round_trip_base(model: nn.Module, cfg: Config) -> None:
    """For a merged QLoRA export: replace each base weight by its dequantized NF4 value, as training saw it."""
    if cfg.finetune.method != "qlora":
        return
    q = cfg.finetune.quant
    for _, linear in quantized_linears(model):
        w = linear.weight
        linear.weight = nn.Parameter(_nf4().to_nf4(w.data.contiguous(), q.block_size, q.scaler_block_size)
                                     .get_original_weight().to(w.dtype), requires_grad=False)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of 4-bit base weights this rank stores (packed data, scales and their factors)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        if is_nf4(p):
            local = p._local_tensor if isinstance(p, DTensor) else p
            total += sum(getattr(local, name).nbytes for name in local.__tensor_flatten__()[0])
    return total
