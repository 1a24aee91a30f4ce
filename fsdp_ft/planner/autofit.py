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
other ones (fewer GPUs, a smaller card) the old choice might not fit. Planning takes seconds to a minute (a
simulated step per setting tried), so the answer is cached in the user's cache folder under a digest of every
input (`_cache_key`): a restart or resume with the same inputs takes it from there. Neither key is part of the run's identity:
they change memory and speed, not what a step computes.
"""
from __future__ import annotations

import time

from pathlib import Path

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.planner.plan import choose, device_memory, has_auto, with_choice
from fsdp_ft.runtime import user_cache


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
    budget = device_memory(cfg, target, local_rank)
    key = _cache_key(cfg, hf_config, len(tokenizer), world, target, budget[0])
    path = user_cache.cache_dir() / "planned_settings.json"
    hit = user_cache.read(path).get(key)
    if hit is not None:  # the same inputs were planned before: the same choice, without the seconds
        chosen = with_choice(cfg, hit["activation_checkpointing"], hit["cpu_offload"])
        return chosen, {**hit["notes"], "planner_s": round(time.perf_counter() - t0, 2), "planner_cached": str(path)}
    with memsim.fake_world(world):
        chosen, notes = choose(cfg, model_dir, hf_config, tokenizer, world, target, budget)
    user_cache.merge(path, key, {"activation_checkpointing": chosen.activation_checkpointing,
                                 "cpu_offload": chosen.fsdp.cpu_offload, "notes": notes,
                                 "planned_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return chosen, {**notes, "planner_s": round(time.perf_counter() - t0, 2)}


def _cache_key(cfg: Config, hf_config, vocab: int, world: int, target: str, budget: int) -> str:
    """Everything the choice depends on: the whole config but where it writes, the model's config and vocabulary,
    ranks, device, budget, the library versions and fsdp_ft's own source (a new release plans afresh)."""
    import hashlib
    import json

    import peft
    import torch
    import transformers

    import fsdp_ft

    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "resume")}
    material = {"config": settings, "model": hf_config.to_dict(), "vocab": vocab, "world": world,
                "target": target, "budget": budget, "source": user_cache.source_digest(Path(fsdp_ft.__file__).parent),
                "versions": [torch.__version__, transformers.__version__, peft.__version__]}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]
