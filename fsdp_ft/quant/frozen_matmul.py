"""The matmuls of a frozen quantized weight (4-bit NF4/FP4, 8-bit rows) as two opaque custom ops.

Written as an autograd.Function, `x @ dequantize(W).T` in forward and `grad @ dequantize(W)` in backward save
only the quantized W in eager mode. Under `torch.compile` the two dequantizations are traced into one joint
graph, merged as a common subexpression, and the partitioner then saves the dequantized weight for backward:
in a compiled QLoRA block every base weight was kept in bf16 from forward to backward (measured with
saved-tensor hooks on a 1536 x 576 layer: eager saved the NF4 weight, compiled a bf16 copy; peak RSS of the CPU
QLoRA bench 1.75 -> 2.06 GB per rank), which for an 8B model is ~14 GiB and the end of QLoRA's memory saving.
As custom ops the dequantized weight exists only inside each op: the graph holds the quantized parts, and
backward's op dequantizes again, compiled or not.

A format registers how its parts make the dense weight (`register`); the ops are looked up by that name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fsdp_ft.runtime import user_cache

# format name -> fn(parts, sizes, weight_dtype, out_dtype) -> dense weight (rows x cols)
_DEQUANTIZE: dict[str, Callable] = {}


def _tag_compile_caches() -> None:
    """Make torch.compile's on-disk caches depend on this package's quantized-weight code. Their keys do not see
    what a tensor subclass's Python `__torch_function__` dispatches to, so after an upgrade that changed these ops
    (adding `transposed`) a graph cached by the old code called the new op with the old arguments and failed; any
    tag the user set is kept."""
    ours = "fsdp_ft-quant-" + user_cache.source_digest(Path(__file__).parent)
    config = torch.compiler.config
    if hasattr(config, "cache_key_tag") and ours not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}+{ours}" if config.cache_key_tag else ours


_tag_compile_caches()


def register(fmt: str, dequantize: Callable) -> None:
    _DEQUANTIZE[fmt] = dequantize


@torch.library.custom_op("fsdp_ft::frozen_linear", mutates_args=())
def frozen_linear(x: torch.Tensor, parts: list[torch.Tensor], sizes: list[int], fmt: str,
                  weight_dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """`F.linear(x, W)` for the frozen weight W of shape `sizes[:2]` held as `parts` in format `fmt`; `x @ W`
    when `transposed` (transformers' Conv1D stores its weight as inputs x outputs)."""
    weight = _DEQUANTIZE[fmt](parts, sizes, weight_dtype, x.dtype)
    return x @ weight if transposed else F.linear(x, weight)


@torch.library.custom_op("fsdp_ft::frozen_linear_input_grad", mutates_args=())
def frozen_linear_input_grad(grad: torch.Tensor, parts: list[torch.Tensor], sizes: list[int], fmt: str,
                             weight_dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """`grad @ W` (`grad @ W.T` when `transposed`): the input's gradient of `frozen_linear` (W never trains)."""
    weight = _DEQUANTIZE[fmt](parts, sizes, weight_dtype, grad.dtype)
    return grad @ (weight.T if transposed else weight)


@frozen_linear.register_fake
def _(x, parts, sizes, fmt, weight_dtype, transposed):
    return x.new_empty((*x.shape[:-1], sizes[1] if transposed else sizes[0]))


@frozen_linear_input_grad.register_fake
def _(grad, parts, sizes, fmt, weight_dtype, transposed):
    return grad.new_empty((*grad.shape[:-1], sizes[0] if transposed else sizes[1]))


def _setup_context(ctx, inputs, output):
    _, parts, ctx.sizes, ctx.fmt, ctx.weight_dtype, ctx.transposed = inputs
    ctx.save_for_backward(*parts)


def _backward(ctx, grad):
    parts = list(ctx.saved_tensors)  # read once: activation checkpointing lets each saved tensor unpack once
    grad_x = frozen_linear_input_grad(grad, parts, ctx.sizes, ctx.fmt, ctx.weight_dtype, ctx.transposed)
    return grad_x, [None] * len(parts), None, None, None, None


frozen_linear.register_autograd(_backward, setup_context=_setup_context)


def linear(x: torch.Tensor, parts: list[torch.Tensor], sizes: list[int], fmt: str, weight_dtype: torch.dtype,
           bias: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
    out = torch.ops.fsdp_ft.frozen_linear(x, parts, sizes, fmt, weight_dtype, transposed)
    return out if bias is None else out + bias
