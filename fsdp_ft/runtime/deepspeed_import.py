"""The optional DeepSpeed import, set up for this machine: on CPU, its gloo accelerator and no shared-memory op
build; quiet logs; a one-line error naming the extra to install when it is missing."""
from __future__ import annotations

import logging
import os
import warnings

import torch

from fsdp_ft.errors import ConfigError


def import_deepspeed():
    """DeepSpeed, on its CPU accelerator (gloo) where there is no GPU; a one-line error when it is not installed."""
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"config key 'engine'=deepspeed needs DeepSpeed ({e}): pip install 'fsdp_ft[deepspeed]'") \
            from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls the c10d collectives torch 2.13 renamed, which warns on every step
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                            "deprecated", FutureWarning)
    if cpu:
        _skip_shared_memory_op()
    return deepspeed


def _skip_shared_memory_op() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce (a C++ build of about a minute, needing a compiler)
    when its communication backend starts; only inference uses it. Mark it unavailable so gloo serves training."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # another DeepSpeed version: it builds the op as it always does
        pass
