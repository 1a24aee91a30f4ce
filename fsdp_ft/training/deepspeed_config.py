"""Our config -> a DeepSpeed config dict, with a user's own DeepSpeed JSON merged over it.

The keys we derive (ZeRO stage, precision, batch sizes, clipping, offload) come from the same config the FSDP
engine reads, so one YAML drives both engines. A `deepspeed.config` JSON extends or overrides that dict (bucket
sizes, overlap, ZeRO++ ...), with two limits: batch sizes must agree with train.* (our data plan decides which
samples each rank sees), and it may not name an optimizer or scheduler (the AdamW and schedule of optim.* are
used, so both engines train alike). `"auto"` values, as in Hugging Face's DeepSpeed files, take our value.
"""
from __future__ import annotations


from fsdp_ft.config import Config, batch, read_user_config
from fsdp_ft.errors import ConfigError
from fsdp_ft.runtime import precision

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
def zero_stage(cfg: Config, user: dict) -> int:
    """deepspeed.stage, else the user JSON's stage, else 3 (the counterpart of FSDP's full sharding)."""
    from_file = user.get("zero_optimization", {}).get("stage", "auto")
    from_file = None if from_file == "auto" else from_file
    if cfg.deepspeed.stage is not None and from_file is not None and cfg.deepspeed.stage != from_file:
        raise ConfigError(f"config key 'deepspeed.stage'={cfg.deepspeed.stage} disagrees with "
                          f"zero_optimization.stage={from_file} in '{cfg.deepspeed.config}'; set one of them")
    return cfg.deepspeed.stage or from_file or 3


def _merge(ours: dict, theirs: dict) -> dict:
    """Theirs over ours, recursively; an "auto" value keeps ours."""
    out = dict(ours)
    for k, v in theirs.items():
        if v == "auto":
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: Config, world_size: int, cuda: bool) -> dict:
    """The DeepSpeed config dict for this run (written to output_dir/deepspeed_config.json)."""
    cfg = precision.resolve_precision(cfg, "cuda" if cuda else "cpu")  # auto: for the device this run is on
    cfg = batch.resolve(cfg, world_size)  # train.global_batch_size: the accumulation on these ranks
    t, user = cfg.train, read_user_config(cfg.deepspeed.config)
    stage, dtype = zero_stage(cfg, user), precision.deepspeed_compute_precision(cfg)
    zero: dict = {"stage": stage}
    if cfg.fsdp.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "communication_data_type": cfg.fsdp.reduce_dtype or "fp32",
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "zero_force_ds_cpu_optimizer": False,   # ... also with offload (DeepSpeedCPUAdam needs a compiled op)
        "steps_per_print": 2**31 - 1,           # we log; DeepSpeed's own step prints stay off
        "wall_clock_breakdown": False,
    }
    merged = _merge(ours, user)
    for key in BATCH_KEYS:
        if merged[key] != ours[key]:
            raise ConfigError(f"config key 'deepspeed.config': '{cfg.deepspeed.config}' sets {key}={merged[key]} "
                              f"but train.* gives {ours[key]}; set it to \"auto\" or drop it")
    merged["zero_optimization"]["stage"] = stage
    if merged["bf16"].get("enabled") and merged["fp16"].get("enabled"):
        raise ConfigError(f"config key 'deepspeed.config': '{cfg.deepspeed.config}' enables both bf16 and fp16")
    return merged


def precision_of(ds: dict) -> str:
    """The compute dtype a (merged) DeepSpeed config trains in."""
    return "bf16" if ds["bf16"].get("enabled") else "fp16" if ds["fp16"].get("enabled") else "fp32"
