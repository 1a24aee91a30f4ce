"""QLoRA's frozen quantized base (NF4, FP4 or int8) as tensor subclasses that FSDP2 shards correctly.

bitsandbytes' `Params4bit` under `fully_shard` trains the right step 0 and then silently diverges (accelerate
#3983, bitsandbytes #1945). torchao's `NF4Tensor` implements FSDP2's tensor-subclass all-gather hooks, so each
rank stores 1/N of the packed 4-bit data and the gathered weight is bit-identical to the unsharded one. The
format is the QLoRA one: the NF4 code book, blocks of 64 weights, and per-block scales quantized again to 8 bits
(double quantization) in blocks of up to 256 that never straddle a row (`scaler_block_size`), so the layout
suits any number of ranks.

FP4 is bitsandbytes' other 4-bit type: the same layout with bitsandbytes' FP4 code book (1 sign, 2 exponent and
1 mantissa bit, divided by its maximum). An NF4Tensor looks values up in the 16-entry table it carries (`.nf4`)
and passes that table on through every op and through FSDP's all-gather, so an NF4Tensor holding the FP4 table
is an FP4 tensor; only quantizing (and torchao's `clone`, which requantizes to NF4 and is never called here)
needs the table by name. int8 is LLM.int8's row-wise format, see `fsdp_ft.quant.int8_weight`.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.quant import experts
from fsdp_ft.quant.int8_weight import Int8Weight

# bitsandbytes' FP4 values in its code order (`bitsandbytes.functional.get_4bit_type('fp4')`), before dividing by 12
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPE_ATTR = "fsdp_ft_quant_type"  # set on each quantized linear: which quantizer fills its weight


def _nf4():
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    from fsdp_ft.quant import nf4_linear

    nf4_linear.install(nf4_tensor)
    return nf4_tensor


def is_nf4(t: torch.Tensor) -> bool:
    """A 4-bit weight (NF4 or FP4: both are NF4Tensors)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    return type(t).__name__ == "NF4Tensor"


def is_quantized(t: torch.Tensor) -> bool:
    """A frozen quantized base weight of any type."""
    from torch.distributed.tensor import DTensor

    return is_nf4(t) or isinstance(t._local_tensor if isinstance(t, DTensor) else t, Int8Weight)


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The frozen base linears under LoRA layers: what QLoRA stores quantized. transformers' Conv1D (GPT-2) is a
    linear layer whose weight is stored inputs x outputs; its rows are quantized and sharded as they are. A
    one-row weight (a scalar gate, such as Qwen2-MoE's shared-expert gate) stays in full precision: no number of
    ranks above one can share its row, and 4 bits would save a few kB."""
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            base = module.get_base_layer()
            if isinstance(base, (nn.Linear, Conv1D)) and base.weight.shape[0] > 1:
                out.append((name, base))
    return out


def shard_blocks(shape: torch.Size, block_size: int, shards: int) -> list[int]:
    """4-bit blocks in each row shard FSDP makes of a weight (torch.chunk of the rows)."""
    rows, per_row = shape[0], shape.numel() // shape[0]
    step = -(-rows // shards)
    return [min(step, rows - start) * per_row // block_size for start in range(0, rows, step)]


AUTO_SCALER_LIMIT = 256  # the QLoRA paper's double-quantization block: `auto` never takes a larger one


def scaler_block_size(shape: torch.Size, block_size: int, setting: int | str) -> int:
    """The double-quantization block of a weight: `setting`, or for `auto` the largest divisor (<= 256) of its
    4-bit blocks per row. Scale blocks then never straddle a row, so every row shard FSDP can cut (any number of
    ranks) holds whole ones, and the choice, hence the stored bits, depends on the shape alone."""
    if setting != "auto":
        return setting
    return largest_divisor(shape.numel() // shape[0] // block_size, AUTO_SCALER_LIMIT)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def check_block_sizes(layers: list[tuple[str, nn.Module]], cfg: Config, shards: int,
                      stacks: list[tuple[str, torch.Size]] = ()) -> None:
    """`check_weights` for quantized linear layers and expert stacks (name, 3-D shape)."""
    check_weights([(name, layer.weight.shape, not isinstance(layer, nn.Linear), None) for name, layer in layers]
                  + [(name, _as_rows(shape), False, shape[1]) for name, shape in stacks], cfg, shards)


def check_weights(weights: list[tuple[str, torch.Size, bool, int | None]], cfg: Config, shards: int) -> None:
    """Every rank's row shard of every weight (name, 2-D shape, stored inputs x outputs (Conv1D), rows per expert
    of a stack or None) must hold the same number of whole rows and (4-bit) whole double-quantization blocks;
    so must each expert of a stack, which runs on its own view of the codes and scales."""
    q = cfg.finetune.quant
    for name, shape, _, _ in weights:  # the quantized formats' row split (FSDP2 calls it to shard) cuts equal pieces
        if shape[0] % shards:
            raise ConfigError(f"finetune.quant.type={q.type}: weight '{name}' has {shape[0]} rows, "
                              f"which {shards} ranks cannot share evenly; exclude it via "
                              "finetune.lora.target_modules or use a number of ranks that divides it")
    if q.type == "int8":
        conv = next((name for name, _, is_conv, _ in weights if is_conv), None)
        if conv:  # LLM.int8 scales each output row; a Conv1D weight's rows are its inputs
            raise ConfigError(f"finetune.quant.type=int8: '{conv}' is a transformers Conv1D (GPT-2 style) layer, "
                              "which int8 does not quantize; use finetune.quant.type=nf4 or fp4")
        return
    counts = []
    for name, shape, _, expert_rows in weights:
        if q.scaler_block_size == "auto" and (shape.numel() // shape[0]) % q.block_size:
            cols = shape.numel() // shape[0]
            raise ConfigError(f"finetune.method=qlora: weight '{name}' {tuple(shape)} has rows of {cols} values, not "
                              f"a multiple of finetune.quant.block_size={q.block_size}, so its 4-bit blocks would "
                              f"straddle FSDP's row shards; set finetune.quant.block_size={math.gcd(cols, q.block_size)}"
                              " or exclude it via finetune.lora.target_modules")
        if shape.numel() % q.block_size:
            raise ConfigError(f"finetune.method=qlora: weight '{name}' {tuple(shape)} is not a multiple of "
                              f"finetune.quant.block_size={q.block_size}; exclude it via finetune.lora.target_modules")
        counts += shard_blocks(shape, q.block_size, shards)
        if expert_rows is not None:
            counts.append(expert_rows * shape[1] // q.block_size)
    if q.scaler_block_size == "auto":
        return
    bad = [c for c in counts if c % q.scaler_block_size]
    if bad:
        common = math.gcd(*counts)
        fits = largest_divisor(common, AUTO_SCALER_LIMIT)
        raise ConfigError(f"finetune.quant.scaler_block_size={q.scaler_block_size} does not divide the 4-bit blocks of "
                          f"every weight's row shard on {shards} rank(s) (e.g. {bad[0]}); set "
                          f"finetune.quant.scaler_block_size={fits}, or auto (the default: valid on any number "
                          "of ranks)")


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
    """Swap every LoRA base weight, and every stacked expert tensor (`quant.experts`), for a quantized placeholder
    (before sharding over `shards` ranks); returns how many tensors."""
    layers = quantized_linears(model)
    stacks = [(f"{mname}.{name}", module, name, module._parameters[name].shape)
              for mname, module, names in experts.stacked_experts(model) for name in names]
    check_block_sizes(layers, cfg, shards, [(name, shape) for name, _, _, shape in stacks])
    for _, linear in layers:
        linear.weight = nn.Parameter(_placeholder(linear.weight.shape, linear.weight.dtype, cfg), requires_grad=False)
        setattr(linear, QUANT_TYPE_ATTR, cfg.finetune.quant.type)
    shapes: dict[nn.Module, dict[str, torch.Size]] = {}
    for _, module, name, shape in stacks:
        dtype = module._parameters[name].dtype
        module._parameters[name] = nn.Parameter(_placeholder(_as_rows(shape), dtype, cfg), requires_grad=False)
        setattr(module, QUANT_TYPE_ATTR, cfg.finetune.quant.type)
        shapes.setdefault(module, {})[name] = shape
    for module, module_shapes in shapes.items():
        experts.install(model, module, module_shapes)
    return len(layers) + len(stacks)


def _as_rows(shape: torch.Size) -> torch.Size:
    """A stack of expert matrices as the 2-D weight of all their rows."""
    return torch.Size((shape[0] * shape[1], shape[2]))


def _placeholder(shape: torch.Size, dtype: torch.dtype, cfg: Config) -> torch.Tensor:
    q = cfg.finetune.quant
    if q.type == "int8":
        return Int8Weight.empty(shape, dtype, "meta")
    return meta_nf4(shape, dtype, q.block_size, scaler_block_size(shape, q.block_size, q.scaler_block_size))


@torch.no_grad()
def to_fp4(full: torch.Tensor, block_size: int, scaler_block_size: int) -> torch.Tensor:
    """bitsandbytes' FP4 codes (nearest value, found as bitsandbytes does: bucketize between sorted code values,
    scaled in fp32), packed two to a byte, with NF4's double-quantized block scales."""
    nf4 = _nf4()
    code = torch.tensor(FP4_VALUES, device=full.device) / 12
    order = torch.argsort(code, stable=True)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    flat = full.contiguous().view(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=full.device)
    step = block_size * 16384  # in slices, so the fp32 and index temporaries stay small for a large weight
    for start in range(0, flat.numel(), step):
        blocks = flat[start:start + step].float().view(-1, block_size)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))).clamp(-1, 1).view(-1)
        codes[start:start + step] = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    scalers, factor, mean = double_quantize_scalers(flat, block_size, scaler_block_size)
    meta = nf4.SubclassTensorArgs(full.shape, full.stride(), 0, full.dtype, full.device, False)
    return nf4.NF4Tensor(meta, block_size, flat.numel() // block_size, scaler_block_size, scalers, factor, mean,
                         codes[::2] << 4 | codes[1::2], code.to(full.dtype))


@torch.no_grad()
def double_quantize_scalers(flat: torch.Tensor, block_size: int, scaler_block_size: int,
                            via_maxima: bool | None = None):
    """torchao's double quantization of the block scales (int8 scales, per-block factors, their mean), the same
    bits on every device: the block maxima are exact anywhere, but their mean is a sum whose order differs between
    CPU and CUDA kernels, so off the CPU (`via_maxima`, default) the maxima go to the host (1/block_size of the
    weight) and torchao's own function runs there on them (block size 1: each maximum is its own block's)."""
    nf4 = _nf4()
    if not (flat.device.type != "cpu" if via_maxima is None else via_maxima):
        return nf4.NF4Tensor.double_quantize_scalers(flat, block_size, scaler_block_size)
    maxima = nf4.get_block_absmax(flat, block_size).cpu()
    return tuple(t.to(flat.device) for t in nf4.NF4Tensor.double_quantize_scalers(maxima, 1, scaler_block_size))


@torch.no_grad()
def to_nf4(full: torch.Tensor, block_size: int, scaler_block_size: int) -> torch.Tensor:
    """torchao's NF4 on the weight's device: codes from exact per-block maxima (the same bits on any device), the
    block scales from `double_quantize_scalers`."""
    nf4 = _nf4()
    q = nf4.to_nf4(full, block_size, scaler_block_size)
    if full.device.type == "cpu":
        return q
    scalers, factor, mean = double_quantize_scalers(full.view(-1), block_size, scaler_block_size)
    return nf4.NF4Tensor(*nf4.construct_nf4_args(q, {"quantized_scalers": scalers, "quantization_factor": factor,
                                                      "scaler_mean": mean}))


def quantize_weight(full: torch.Tensor, quant_type: str, block_size: int = 64,
                    scaler_block_size: int = 256) -> torch.Tensor:
    """A full float weight as a quantized tensor of `quant_type` (nf4, fp4, int8), on the weight's device; the
    stored bits do not depend on that device (tests/test_gpu.py), so a GPU quantizes a base in seconds."""
    full = full.contiguous()
    if quant_type == "int8":
        return Int8Weight.from_float(full)
    if quant_type == "fp4":
        return to_fp4(full, block_size, scaler_block_size)
    return to_nf4(full, block_size, scaler_block_size)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """A quantized weight's values as a plain float tensor of its dtype."""
    return t.dequantize() if isinstance(t, Int8Weight) else t.get_original_weight()


def quantize_like(full: torch.Tensor, like: torch.Tensor, module: nn.Module,
                  device: torch.device | None = None) -> torch.Tensor:
    """Quantize a full weight as the placeholder `like` of `module` (its type, dtype and block sizes), on `device`
    (default: where `full` is)."""
    quant_type = getattr(module, QUANT_TYPE_ATTR, "nf4")
    full = full.to(device=device or full.device, dtype=like.dtype)
    if quant_type == "int8":
        return quantize_weight(full, "int8")
    return quantize_weight(full, quant_type, like.block_size, like.scaler_block_size)


@torch.no_grad()
def round_trip_base(model: nn.Module, cfg: Config) -> None:
    """For a merged QLoRA export: replace each base weight (and expert stack) by its dequantized value, as training
    saw it."""
    if cfg.finetune.method != "qlora":
        return
    q = cfg.finetune.quant
    for module, name in ([(linear, "weight") for _, linear in quantized_linears(model)]
                         + [(m, n) for _, m, names in experts.stacked_experts(model) for n in names]):
        w = module._parameters[name]
        rows = w.data.reshape(-1, w.shape[-1])  # an expert stack is quantized as the 2-D weight of its rows
        scalers = scaler_block_size(rows.shape, q.block_size, q.scaler_block_size)
        dense = dequantize(quantize_weight(rows, q.type, q.block_size, scalers)).to(w.dtype).reshape(w.shape)
        module._parameters[name] = nn.Parameter(dense, requires_grad=False)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of quantized base weights this rank stores (codes, scales and their factors)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        if is_quantized(p):
            local = p._local_tensor if isinstance(p, DTensor) else p
            total += sum(getattr(local, name).nbytes for name in local.__tensor_flatten__()[0])
    return total


def base_layout(model: nn.Module) -> str | None:
    """A digest of the quantized base as stored: each quantized tensor's name, model shape, type and block sizes
    (None when nothing is quantized). A resumed QLoRA run must find the base its adapters trained on."""
    from torch.distributed.tensor import DTensor

    rows = []
    for mname, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is None or not is_quantized(p):
                continue
            local = p._local_tensor if isinstance(p, DTensor) else p
            rows.append((f"{mname}.{name}", tuple(experts.logical_shape(module, name, p)),
                         getattr(module, QUANT_TYPE_ATTR, "nf4"), getattr(local, "block_size", None),
                         getattr(local, "scaler_block_size", None)))
    if not rows:
        return None
    return hashlib.sha256(repr(sorted(rows)).encode()).hexdigest()[:16]
