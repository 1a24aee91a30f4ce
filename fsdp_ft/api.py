"""The Python API: load a config, train it. Every launcher (`fsdp-ft train`, `fsdp-ft run`, `fsdp-ft submit`) ends
in `train`, which also picks the engine.

    import fsdp_ft
    cfg = fsdp_ft.load_config("configs/tiny.yaml", ["train.max_steps=20"])
    result = fsdp_ft.train(cfg)   # one process, or each rank under torchrun
"""
from __future__ import annotations

from fsdp_ft.config import Config, load_config

__all__ = ["Config", "load_config", "train"]


def train(cfg: Config):
    """Train `cfg` in this process (one rank of the job when launched by torchrun or SLURM): the host allocator
    is tuned first, then the engine cfg.engine names runs. Returns the `TrainResult` (model, tokenizer, final
    state, output_dir)."""
    from fsdp_ft.planner import autofit
    from fsdp_ft.runtime import host_malloc

    malloc = host_malloc.tune() if cfg.train.tune_host_malloc else "default (train.tune_host_malloc=false)"
    cfg, auto = autofit.resolve(cfg)  # activation_checkpointing / fsdp.cpu_offload = auto, before the group starts
    if cfg.engine == "deepspeed":
        from fsdp_ft.training import deepspeed_engine
        return deepspeed_engine.train(cfg, auto)
    from fsdp_ft.training import fsdp_engine
    return fsdp_engine.train(cfg, malloc, auto)
