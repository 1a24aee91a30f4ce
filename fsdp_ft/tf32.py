"""TF32 matmuls on GPUs (`train.tf32`).

Set and read through torch's per-backend precision switches (`torch.backends.cuda.matmul.fp32_precision`), which
leave CPU matmuls alone: `torch.set_float32_matmul_precision("high")` would also let oneDNN round fp32 CPU matmuls.
torch refuses a read through the legacy `allow_tf32` flags once the new switch was set, so everything here goes
through one API (the legacy flags only on a torch that lacks the new one).
"""
from __future__ import annotations

import torch


def _new_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


def set_tf32(on: bool) -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (on) or IEEE fp32 (off)."""
    if _new_api():
        mode = "tf32" if on else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def enabled() -> bool:
    """Whether fp32 matmuls on CUDA may use TF32 (by train.tf32, or by anything that set torch's switches)."""
    if _new_api():
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def apply(on: bool, device: torch.device) -> bool | None:
    """train.tf32 for this rank's device; what the setup row records (None: not a GPU, nothing set)."""
    if device.type != "cuda":
        return None
    set_tf32(on)
    return enabled()
