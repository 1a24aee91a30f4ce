"""TF32 matmuls on GPUs (`train.tf32`).

Set through `torch.set_float32_matmul_precision` and cuDNN's `allow_tf32`, the API every reader understands.
torch's newer per-backend switches (`torch.backends.cuda.matmul.fp32_precision = "tf32"`) make each later read
of the legacy flags (`torch.backends.cuda.matmul.allow_tf32`, `torch.get_float32_matmul_precision()`) raise,
and torch itself reads them: inductor's max-autotune and flex attention. The global setter also switches oneDNN's
fp32 CPU matmuls to TF32; where they were exact, that one per-backend value is set back to exact, which the legacy
reads accept (only a CPU TF32 or bf16 setting that disagrees with the global one makes them raise).
This runs on CUDA ranks only.
"""
from __future__ import annotations

import torch


def _mkldnn_matmul():
    """oneDNN's per-backend matmul switch, where this torch has one."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return matmul if matmul is not None and hasattr(matmul, "fp32_precision") else None


def set_tf32(on: bool) -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (on) or IEEE fp32 (off)."""
    cpu = _mkldnn_matmul()
    cpu_before = cpu.fp32_precision if cpu is not None else None
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on
    if cpu is not None and cpu_before in ("none", "ieee") and cpu.fp32_precision != "ieee":
        cpu.fp32_precision = "ieee"  # exact, as it was (a TF32/bf16 choice someone made for the CPU stays theirs)


def enabled() -> bool:
    """Whether fp32 matmuls on CUDA may use TF32 (by train.tf32, or by anything that set torch's switches)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # someone switched the per-backend API alone: the legacy read refuses, this one answers
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def apply(on: bool, device: torch.device) -> bool | None:
    """train.tf32 for this rank's device; what the setup row records (None: not a GPU, nothing set)."""
    if device.type != "cuda":
        return None
    set_tf32(on)
    return enabled()
