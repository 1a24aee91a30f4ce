"""A faster dequantization for torchao's NF4Tensor, and the 4-bit linear layer that uses it.

torchao dequantizes a 4-bit weight in every forward and again in every backward by widening each nibble to an
int64 index, looking the two nibbles of each byte up separately in fp32, scaling both halves and interleaving
them with `torch.stack`: ~20 bytes of memory traffic per weight element before the final cast. Profiled in a
QLoRA step (2 CPU ranks, bf16, SmolLM2-135M shape, seq 512) that took 2.6 s of a 6.6 s step. Here each byte is
looked up once in a 256-entry table of value pairs and scaled straight into the output dtype (one 1536 x 576
weight to bf16, 1 thread: 3.0 ms in torchao, ~0.4 ms here); the result is
bit-equal to torchao's (`tests/test_nf4_linear.py`): the same fp32 table values times the same scalers, rounded
once. The matmuls are fsdp_ft.quant.frozen_matmul's custom ops, so a compiled block saves the 4-bit weight for
backward, not a dequantized copy. The layer is installed as torchao's own `F.linear` override for NF4Tensors, so
FSDP2, PEFT and the quantized-weight bookkeeping see no difference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsdp_ft.quant import frozen_matmul

_WORD = {2: torch.int32, 4: torch.int64}  # an integer as wide as two table values
FORMAT = "nf4"  # fsdp_ft.quant.frozen_matmul's name for this layout (NF4 and FP4 tables alike)


def parts(weight) -> tuple[list[torch.Tensor], list[int]]:
    """The NF4Tensor's inner tensors and sizes, as frozen_matmul's ops take them."""
    inner = [weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
             weight.nf4]
    return inner, [weight.shape[0], weight.shape[1], weight.block_size, weight.scaler_block_size]


def _dequantize(parts, sizes, weight_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    quantized_data, quantized_scalers, quantization_factor, scaler_mean, table = parts
    rows, cols, block_size, scaler_block_size = sizes
    # the table is in the dtype torchao looks values up in (the quantized weight's)
    pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=-1)  # byte hi*16+lo -> (hi, lo)
    # each pair read as one word: a 1-D gather is ~3x faster than gathering rows of two
    word = _WORD[table.element_size()]
    words = pairs.view(word).view(-1).index_select(0, quantized_data.reshape(-1).to(torch.int32))
    values = words.view(table.dtype)
    # the double-quantized scalers, unpacked as torchao's NF4Tensor.dequantize_scalers does
    per_block = quantized_scalers.view(-1, scaler_block_size) / quantization_factor.unsqueeze(-1)
    scalers = per_block.flatten().to(weight_dtype) + scaler_mean
    out = torch.empty((rows, cols), dtype=dtype, device=values.device)
    torch.mul(values.view(-1, block_size), scalers.view(-1, 1), out=out.view(-1, block_size))
    return out


frozen_matmul.register(FORMAT, _dequantize)


def dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)` for an NF4Tensor (NF4 or fsdp_ft's FP4 table), computed with one lookup per byte."""
    return _dequantize(*parts(weight), weight.dtype, dtype)


def linear(input: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with a frozen 4-bit weight: only the quantized weight is saved for backward, compiled or not."""
    return frozen_matmul.linear(input, *parts(weight), FORMAT, weight.dtype, bias)


def addmm(input: torch.Tensor, mat1: torch.Tensor, mat2, *, beta=1, alpha=1) -> torch.Tensor:
    """`bias + x @ W` with a frozen 4-bit W of shape inputs x outputs: transformers' Conv1D (GPT-2) forward."""
    if beta != 1 or alpha != 1 or type(mat2).__name__ != "NF4Tensor":
        raise NotImplementedError  # torchao's table falls back to the plain op
    return frozen_matmul.linear(mat1, *parts(mat2), FORMAT, mat2.dtype, input, transposed=True)


def install(nf4_module) -> None:
    """Route `F.linear` (and Conv1D's `torch.addmm`) on NF4Tensors through our matmuls (torchao's table of
    overridden torch functions)."""
    nf4_module.NF4_TORCH_FUNCTIONS[F.linear] = linear
    nf4_module.NF4_TORCH_FUNCTIONS[torch.addmm] = addmm
