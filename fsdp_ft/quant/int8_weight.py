"""An 8-bit frozen base weight in LLM.int8's storage format that FSDP2 shards by rows.

The format is bitsandbytes' `Int8Params`: the weight is cast to fp16, each row is scaled by 127 / its absmax and
rounded to int8 (`CB`), and the row absmax is kept in fp32 (`SCB`). Both are row-wise, so a row shard of the weight
is just the matching rows of both tensors: FSDP2's all-gather hooks gather them and nothing is requantized.

The matmul dequantizes the gathered weight (`CB * SCB / 127`) in the input dtype, as bitsandbytes does when it
trains on CPU (`MatMul8bitFp`); its CUDA path instead multiplies in int8 with fp16 outlier columns, which we do
not reproduce. The weight never trains, so backward only needs the input gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fsdp_ft.quant import frozen_matmul

aten = torch.ops.aten
FORMAT = "int8"  # fsdp_ft.quant.frozen_matmul's name for this layout
_OPS = {}


def _implements(*ops):
    def register(fn):
        for op in ops:
            _OPS[op] = fn
        return fn
    return register


@torch.no_grad()
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 row absmax) exactly as bitsandbytes' `Int8Params` makes them (via fp16)."""
    half = weight.to(torch.float16)
    absmax = half.abs().amax(dim=1).float()
    inverse = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))  # an all-zero row stays zero
    return torch.round(half * inverse.unsqueeze(1)).to(torch.int8), absmax


def _dequantize(parts, sizes, weight_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """codes x absmax / 127, computed as bitsandbytes does (the product rounded once to `dtype`)."""
    codes, absmax = parts
    return codes.to(dtype).mul_(absmax.unsqueeze(1).mul(1.0 / 127.0))


frozen_matmul.register(FORMAT, _dequantize)


class Int8Weight(torch.Tensor):
    """A 2-D weight stored as int8 rows (`codes`) and each row's absmax (`absmax`); looks like a `dtype` tensor."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, strides=codes.stride(), dtype=dtype,
                                                   device=codes.device, requires_grad=False)

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype):
        self.codes = codes
        self.absmax = absmax

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Weight":
        return cls(*quantize_rows(weight), weight.dtype)

    @classmethod
    def empty(cls, shape: torch.Size, dtype: torch.dtype, device) -> "Int8Weight":
        """A placeholder (on the meta device: lets FSDP2 shard the layout before any weight is read)."""
        return cls(torch.empty(shape, dtype=torch.int8, device=device),
                   torch.empty(shape[0], dtype=torch.float32, device=device), dtype)

    def parts(self) -> tuple[list[torch.Tensor], list[int]]:
        """The inner tensors and sizes, as frozen_matmul's ops take them."""
        return [self.codes, self.absmax], list(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _dequantize(*self.parts(), self.dtype, dtype or self.dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        return ["codes", "absmax"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Int8Weight(inner["codes"], inner["absmax"], dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = (list(args) + [kwargs.get("bias")])[:3]
            # W saved in 8 bits and dequantized again for backward, compiled or not
            return frozen_matmul.linear(x, *weight.parts(), FORMAT, weight.dtype, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in _OPS:
            return _OPS[func](func, args, kwargs or {})
        raise NotImplementedError(f"Int8Weight does not support {func}")

    # FSDP2's all-gather extension: gather the int8 rows and their absmax, rebuild the weight from them
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        return (self.codes, self.absmax), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        codes, absmax = all_gather_outputs
        if out is not None:  # later gathers write into the same storage
            return None
        return Int8Weight(codes, absmax, self.dtype), (codes, absmax)


# ---------------------------------------------------------------- the ops FSDP2 and nn.Module apply to a weight

def _both(t: Int8Weight, rows_fn, codes_fn=None) -> Int8Weight:
    """Apply a row-preserving op to the codes (`codes_fn`, default `rows_fn`) and to the absmax (`rows_fn`)."""
    return Int8Weight((codes_fn or rows_fn)(t.codes), rows_fn(t.absmax), t.dtype)


@_implements(aten.detach.default, aten.alias.default)
def _detach(func, args, kwargs):
    return _both(args[0], lambda x: func(x))


@_implements(aten.clone.default, aten._pin_memory.default)
def _clone(func, args, kwargs):
    return _both(args[0], lambda x: func(x, *args[1:], **kwargs))


@_implements(aten.empty_like.default)
def _empty_like(func, args, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    return _both(args[0], lambda x: func(x, **kwargs))


@_implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    t = args[0]
    if kwargs.get("dtype") not in (None, t.dtype):  # .to(float dtype): the dense weight
        return t.dequantize(kwargs["dtype"]).to(kwargs.get("device") or t.device)
    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    return _both(t, lambda x: func(x, **kwargs))


@_implements(aten.split.Tensor)
def _split(func, args, kwargs):
    t, size = args[0], args[1]
    if (args[2] if len(args) > 2 else kwargs.get("dim", 0)) != 0:
        raise NotImplementedError("Int8Weight splits by rows only")
    return [Int8Weight(c, a, t.dtype) for c, a in zip(func(t.codes, size), func(t.absmax, size))]


@_implements(aten.slice.Tensor)
def _slice(func, args, kwargs):
    t, dim = args[0], (args[1] if len(args) > 1 else 0)
    if dim != 0:
        raise NotImplementedError("Int8Weight slices by rows only")
    return _both(t, lambda x: func(x, 0, *args[2:], **kwargs))


@_implements(aten.new_zeros.default)
def _new_zeros(func, args, kwargs):
    t, size = args[0], list(args[1])
    return Int8Weight(t.codes.new_zeros(size), t.absmax.new_zeros(size[:1]), t.dtype)


@_implements(aten.view.default, aten.as_strided.default)
def _view(func, args, kwargs):
    """FSDP2 views its padded shard flat and strides the gathered weight back to its shape; with whole rows
    on every rank (even sharding is checked up front) both keep the same rows, so the weight is returned as is."""
    t = args[0]
    size = list(args[1])
    if size not in ([-1], [t.numel()], list(t.shape)):
        raise NotImplementedError(f"Int8Weight cannot be viewed as {size}")
    return Int8Weight(t.codes, t.absmax, t.dtype)


@_implements(aten.copy_.default)
def _copy(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(src, Int8Weight):
        src = Int8Weight.from_float(src)
    dst.codes.copy_(src.codes)
    dst.absmax.copy_(src.absmax)
    return dst


@_implements(aten.is_pinned.default)
def _is_pinned(func, args, kwargs):
    return args[0].codes.is_pinned() and args[0].absmax.is_pinned()


@_implements(torch.ops._c10d_functional.wait_tensor.default)
def _wait(func, args, kwargs):
    return _both(args[0], func)


torch.serialization.add_safe_globals([Int8Weight])
