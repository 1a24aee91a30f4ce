"""train.tf32: TF32 matmuls are switched on CUDA ranks only, through the API every reader of torch's switches
understands: after it, the legacy reads that inductor's max-autotune and flex attention make
(`torch.backends.cuda.matmul.allow_tf32`, `torch.get_float32_matmul_precision()`) work and report TF32, and
oneDNN's fp32 CPU matmuls stay exact (the MFU peak reads it too: tests/test_flops.py has the TF32 figures)."""
from __future__ import annotations

import pytest
import torch

from fsdp_ft.config import Config
from fsdp_ft.runtime import tf32

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def restore_switches():
    """Put torch's switches back through the legacy API (consistent for every later test in this process)."""
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision if NEW_API else None
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn
    if NEW_API:
        torch.backends.mkldnn.matmul.fp32_precision = mkldnn


def _legacy_reads() -> tuple:
    """What inductor and flex attention read; each raised after the per-backend switch was used."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
            torch._C._get_cublas_allow_tf32(), torch.backends.cudnn.allow_tf32)


def test_default_is_on():
    assert Config().train.tf32 is True


def test_cuda_rank_switches_tf32_readably_and_leaves_cpu_matmuls_alone(restore_switches):
    cpu_before = torch.backends.mkldnn.matmul.fp32_precision if NEW_API else None
    assert tf32.apply(True, torch.device("cuda", 0)) is True
    assert _legacy_reads() == (True, "high", True, True)
    if NEW_API:
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.mkldnn.matmul.fp32_precision in (cpu_before, "ieee")  # never tf32 or bf16
        assert torch.backends.mkldnn.matmul.fp32_precision not in ("tf32", "bf16")
    assert tf32.apply(False, torch.device("cuda", 0)) is False
    assert _legacy_reads() == (False, "highest", False, False)
    if NEW_API:
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_cpu_rank_changes_nothing(restore_switches):
    before = _legacy_reads()
    assert tf32.apply(True, torch.device("cpu")) is None
    assert _legacy_reads() == before


@pytest.mark.skipif(not NEW_API, reason="this torch has no per-backend precision switches")
def test_reads_switches_set_by_either_api(restore_switches):
    """TF32 switched by a user or a library is counted in the MFU peak: through the global setter, and through
    the per-backend switch alone (where the legacy read raises)."""
    torch.set_float32_matmul_precision("high")
    assert tf32.enabled()
    torch.set_float32_matmul_precision("highest")
    assert not tf32.enabled()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()  # the mixed state train.tf32 no longer makes
    assert tf32.enabled()
