"""train.tf32: TF32 matmuls are switched on CUDA ranks only, through the API torch reads back without
complaint (the MFU peak reads it: tests/test_flops.py has the table's TF32 figures)."""
from __future__ import annotations

import pytest
import torch

from fsdp_ft import flops, tf32
from fsdp_ft.config import Config


@pytest.fixture
def restore_switches():
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    torch.backends.mkldnn.matmul.fp32_precision = mkldnn


def test_default_is_on():
    assert Config().train.tf32 is True


def test_cuda_rank_sets_the_cuda_switches_and_leaves_cpu_matmuls_alone(restore_switches):
    cpu_before = torch.backends.mkldnn.matmul.fp32_precision
    assert tf32.apply(True, torch.device("cuda", 0)) is True
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_before  # oneDNN's fp32 CPU matmuls stay exact
    assert tf32.apply(False, torch.device("cuda", 0)) is False
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not tf32.enabled()


def test_cpu_rank_changes_nothing(restore_switches):
    before = torch.backends.cuda.matmul.fp32_precision
    assert tf32.apply(True, torch.device("cpu")) is None
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_reads_switches_set_by_torch_s_global_precision(restore_switches):
    """A user (or a library) that called torch.set_float32_matmul_precision('high') gets TF32 counted in the MFU
    peak; the legacy read `allow_tf32` would raise here once the new API was used."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.set_float32_matmul_precision("high")
    assert tf32.enabled()
    torch.set_float32_matmul_precision("highest")
    assert not tf32.enabled()

