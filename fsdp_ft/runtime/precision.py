"""`fsdp.mixed_precision: auto`, resolved once for the device a run computes on.

auto is bf16 on a CUDA device that computes bf16 natively (Ampere and later: what a GPU user expects, at the
throughput the MFU peak assumes) and fp32 everywhere else: on CPUs, where bf16 matmuls can be many times slower
than fp32 (AVX2-only EPYCs), and on older GPUs, where bf16 is emulated. fp16 is never chosen: it needs loss
scaling, which the user should ask for.

Training, the planner and inference resolve `auto` before anything reads the value: the run directory's
config.yaml and its identity fingerprint then hold the precision the run really computed in, and a run resumed
on another kind of device is compared by that, not by the word `auto`.

`DTYPE` maps the config's dtype names to torch's, for every module that turns a name into a dtype.
"""
from __future__ import annotations

import dataclasses

import torch

AUTO = "auto"
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_native(device="cuda") -> bool:
    """Whether `device` is a CUDA device with native bf16 matmuls (emulated bf16 on pre-Ampere cards is slow)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch whose check has no `including_emulation` (it then reports native support only)
        return bool(torch.cuda.is_bf16_supported())


def auto_precision(device_type: str, bf16_supported: bool | None = None) -> str:
    """What `auto` means on a device of `device_type`; `bf16_supported` stands in for a device that is not here
    (`fsdp-ft plan` for GPUs on a CPU machine assumes a bf16 card when there is none to ask)."""
    if device_type != "cuda":
        return "fp32"
    if bf16_supported is None:
        bf16_supported = bf16_native("cuda") if torch.cuda.is_available() else True
    return "bf16" if bf16_supported else "fp32"


def resolve_precision(cfg, device, bf16_supported: bool | None = None):
    """`cfg` with fsdp.mixed_precision=auto replaced by its meaning on `device` (a torch.device or a device type
    such as "cuda"); cfg itself when it is not auto."""
    if cfg.fsdp.mixed_precision != AUTO:
        return cfg
    value = auto_precision(str(device).split(":")[0], bf16_supported)
    return dataclasses.replace(cfg, fsdp=dataclasses.replace(cfg.fsdp, mixed_precision=value))


def default_device():
    """The device a plain process computes on: the current GPU where there is one (as training and inference pick)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def mixed_precision(cfg) -> str:
    """cfg.fsdp.mixed_precision, with `auto` resolved for this process's device: for readers handed a config
    nobody resolved (library use, tests); training resolves it once, up front (`resolve_precision`)."""
    value = cfg.fsdp.mixed_precision
    return auto_precision(default_device().type) if value == AUTO else value


def compute_precision(cfg) -> str:
    """The dtype FSDP runs the blocks in: fsdp.param_dtype, else fsdp.mixed_precision (FSDP2 casts the stored
    parameters, whatever model.dtype is, to this for the forward and backward)."""
    return cfg.fsdp.param_dtype or mixed_precision(cfg)


def deepspeed_compute_precision(cfg) -> str:
    """engine=deepspeed's compute dtype: fsdp.param_dtype / fsdp.mixed_precision as for FSDP, or model.dtype when
    that is lower (DeepSpeed computes in the dtype it stores)."""
    mp = compute_precision(cfg)
    return mp if mp != "fp32" else cfg.model.dtype
