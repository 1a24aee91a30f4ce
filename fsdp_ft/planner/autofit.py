"""activation_checkpointing=auto and fsdp.cpu_offload=auto: at start, the planner's cheapest setting that fits.

Tried cheapest first (in lost speed): no checkpointing, selective:2, full, then the same with CPU offload (GPUs
only; on CPU ranks the state is in host memory already, so offload resolves to false). The first whose predicted
peak per rank (`plan.predict`, the `fsdp-ft plan` simulation) is within plan.HEADROOM of the memory budget wins;
when none fits, the most frugal is taken and the note says so. The budget is fsdp.memory_budget_gib, else the
rank's GPU memory, else (CPU) host RAM over the ranks on the node.

It runs in every rank's process before the process group starts (the simulation needs a fake group of its own).
Every rank has the same inputs (config, model files, world size, budget), so all decide alike; training checks
that once the group is up (`scaffold.run`): GPUs of different sizes could decide differently, and then the keys
must be set explicitly (or fsdp.memory_budget_gib).
A resume plans again: the choice depends only on those inputs, so it is the same on the same machines, and on
other ones (fewer GPUs, a smaller card) the old choice might not fit. Neither key is part of the run's identity:
they change memory and speed, not what a step computes.
"""
from __future__ import annotations

import time

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.planner.plan import choose, device_memory, has_auto


def resolve(cfg: Config) -> tuple[Config, dict]:
    """`cfg` with the auto keys replaced by the planner's choice, and the set-up row's `auto` entry (one note per
    auto key, and the seconds planning took). `cfg` itself and {} when neither key is auto."""
    if not has_auto(cfg):
        return cfg, {}
    import torch
    import torch.distributed as dist

    from fsdp_ft.model.build import load_hf_config, load_tokenizer, resolve_model_dir
    from fsdp_ft.planner import memsim
    from fsdp_ft.runtime import distributed

    if dist.is_initialized():
        raise ConfigError("activation_checkpointing=auto / fsdp.cpu_offload=auto are planned before the process "
                          "group starts, but this process already has one (a second run in one process): set "
                          "them explicitly")
    t0 = time.perf_counter()
    _rank, world, local_rank = distributed.read_launch_env()
    target = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = resolve_model_dir(cfg)
    tokenizer, hf_config = load_tokenizer(cfg, model_dir), load_hf_config(cfg, model_dir)
    with memsim.fake_world(world):
        cfg, notes = choose(cfg, model_dir, hf_config, tokenizer, world, target,
                            device_memory(cfg, target, local_rank))
    return cfg, {**notes, "planner_s": round(time.perf_counter() - t0, 2)}
