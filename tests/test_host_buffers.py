"""fsdp_ft.parallel.host_buffers.BufferPool hands a buffer out again only once nothing holds its memory."""
from __future__ import annotations

import torch

from fsdp_ft.parallel.host_buffers import BufferPool


def test_a_buffer_comes_back_only_when_every_view_of_it_is_gone():
    pool = BufferPool()
    cpu = torch.device("cpu")
    a = pool.get((6,), torch.float32, cpu)
    b = pool.get((6,), torch.float32, cpu)
    assert a.data_ptr() != b.data_ptr()  # both in use: two buffers
    part = a[2:4]  # e.g. a gradient that is a view of a reduce output
    a_ptr = a.data_ptr()
    del a
    c = pool.get((6,), torch.float32, cpu)
    assert c.data_ptr() not in (a_ptr, b.data_ptr())  # `part` still holds a's memory
    del part
    d = pool.get((2, 3), torch.float32, cpu)  # same numel and dtype, another shape: the freed buffer, reshaped
    assert d.data_ptr() == a_ptr and d.shape == (2, 3)
    assert pool.held_bytes() == 3 * 6 * 4


def test_buffers_of_another_size_or_dtype_are_kept_apart():
    pool = BufferPool()
    cpu = torch.device("cpu")
    x = pool.get((4,), torch.bfloat16, cpu)
    x_ptr = x.data_ptr()
    del x
    assert pool.get((4,), torch.float32, cpu).data_ptr() != x_ptr
    assert pool.get((8,), torch.bfloat16, cpu).data_ptr() != x_ptr
    y = pool.get((4,), torch.bfloat16, cpu)
    assert y.data_ptr() == x_ptr and y.dtype == torch.bfloat16
    y.fill_(3)  # writes reach the pooled memory
    assert pool.get((4,), torch.bfloat16, cpu).data_ptr() != x_ptr  # still held by y
