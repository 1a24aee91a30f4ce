"""fsdp_ft's 4-bit linear layer (fsdp_ft/quant/nf4_linear.py) computes exactly what torchao's does: dequantized weights
bit-equal to `NF4Tensor.get_original_weight().to(dtype)`, and forward and backward of `F.linear` bit-equal to
torchao's own `LinearNF4`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsdp_ft.quant import nf4_linear, quantize

SHAPES = [((1536, 576), 256), ((64, 64), 64), ((192, 576), 64)]  # (weight shape, scaler block size)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,scaler_block", SHAPES)
def test_dequantize_bit_equal_to_torchao(quant_type, stored, shape, scaler_block):
    torch.manual_seed(0)
    q = quantize.quantize_weight(torch.randn(shape, dtype=stored), quant_type, scaler_block_size=scaler_block)
    for dtype in (torch.bfloat16, torch.float32):
        want = q.get_original_weight().to(dtype)
        got = nf4_linear.dequantize(q, dtype)
        assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want), (quant_type, stored, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_forward_and_backward_bit_equal_to_torchao(dtype):
    nf4 = quantize._nf4()  # installs fsdp_ft's layer for F.linear on NF4Tensors
    assert nf4.NF4_TORCH_FUNCTIONS[F.linear] is nf4_linear.linear
    torch.manual_seed(0)
    q = quantize.quantize_weight(torch.randn(192, 576), "nf4", scaler_block_size=64)
    bias = torch.randn(192, dtype=dtype)
    x = torch.randn(3, 7, 576, dtype=dtype, requires_grad=True)
    out = F.linear(x, q, bias)  # dispatched through torchao's table to fsdp_ft's layer
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = nf4.LinearNF4.apply(x_ref, q) + bias  # torchao's own autograd function
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
    assert torch.equal(out, ref) and torch.equal(grad, grad_ref)
    assert "fsdp_ft_frozen_linear" in out.grad_fn.next_functions[0][0].name()  # fsdp_ft's op, not torchao's
    assert ref.grad_fn.next_functions[0][0]._forward_cls is nf4.LinearNF4
