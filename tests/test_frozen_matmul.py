"""A frozen quantized weight's linear (fsdp_ft/quant/frozen_matmul.py) keeps only the quantized weight for backward,
in eager mode and under torch.compile, and compiled it computes what eager does.

Before these custom ops a compiled block merged forward's and backward's dequantization and saved the dense
weight: the saved-tensor hooks below then saw a bf16 tensor of the weight's shape in every compiled linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsdp_ft.quant import quantize
from fsdp_ft.quant.int8_weight import Int8Weight

SHAPE = (256, 128)


def frozen(fmt: str, dtype: torch.dtype):
    torch.manual_seed(0)
    weight = torch.randn(SHAPE, dtype=dtype)
    return Int8Weight.from_float(weight) if fmt == "int8" else quantize.quantize_weight(weight, fmt)


def run(fn, x: torch.Tensor):
    """Output, input gradient, and (shape, dtype, quantized) of every tensor autograd saved; `quantized`: the tensor
    is a quantized weight itself (an NF4Tensor or Int8Weight, whose shape and dtype are the dense weight's)."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, type(t) is not torch.Tensor))
        return t

    x = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    return y, grad, saved


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_saves_the_quantized_weight_and_matches_eager(fmt, dtype):
    torch._dynamo.reset()
    weight, bias = frozen(fmt, dtype), torch.randn(SHAPE[0], dtype=dtype)

    def block(x):
        return F.silu(F.linear(x, weight, bias)) * 2

    x = torch.randn(2, 16, SHAPE[1], dtype=dtype)
    y, grad, saved = run(block, x)
    y_c, grad_c, saved_c = run(torch.compile(block, fullgraph=True), x)
    for where, kept in (("eager", saved), ("compiled", saved_c)):
        dense = [s for s in kept if s[0] in (SHAPE, SHAPE[::-1]) and s[1].is_floating_point and not s[2]]
        assert not dense, f"{where} saved a dequantized weight: {kept}"
        assert any(d in (torch.uint8, torch.int8) or quantized for _, d, quantized in kept), kept
    # the matmuls are the same ops; inductor fuses the bias, silu and product around them without rounding to
    # bf16 in between, so bf16 differs by a rounding step of the larger values and fp32 by its own rounding
    tol = 1e-6 if dtype == torch.float32 else 2.0 ** -7
    for got, want in ((y_c, y), (grad_c, grad)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_gradient_is_the_dense_weights():
    """The input gradient is `grad @ W` with W the dequantized weight (the weight itself gets none)."""
    weight = frozen("nf4", torch.float32)
    dense = weight.get_original_weight()
    x = torch.randn(5, SHAPE[1], requires_grad=True)
    g = torch.randn(5, SHAPE[0])
    (got,) = torch.autograd.grad(F.linear(x, weight), x, g)
    torch.testing.assert_close(got, g @ dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_under_activation_checkpointing(fmt):
    """Checkpointed (non-reentrant, as fsdp_ft wraps blocks) the layer recomputes and gives the same gradient;
    checkpointing lets each saved tensor be unpacked only once, which backward must respect."""
    from torch.utils.checkpoint import checkpoint

    weight = frozen(fmt, torch.float32)

    def block(x):
        return F.silu(F.linear(x, weight)) * 2

    x = torch.randn(2, 16, SHAPE[1])
    y, grad, _ = run(block, x)
    y_ac, grad_ac, _ = run(lambda t: checkpoint(block, t, use_reentrant=False), x)
    assert torch.equal(y_ac, y) and torch.equal(grad_ac, grad)


def test_compile_caches_are_keyed_on_the_quantized_weight_code():
    """Inductor's cache keys do not see a subclass's `__torch_function__`: after an upgrade that changed these ops,
    a graph cached by the old code (5 arguments) called the new op (6) and failed. The cache tag now carries a
    digest of fsdp_ft/quant's sources, computed here independently."""
    import hashlib
    from pathlib import Path

    import fsdp_ft.quant.frozen_matmul as module

    folder = Path(module.__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.py")))).hexdigest()[:16]
    assert f"fsdp_ft-quant-{digest}" in torch.compiler.config.cache_key_tag.split("+")
