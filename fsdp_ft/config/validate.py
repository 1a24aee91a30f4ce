"""Cross-field checks of a loaded config, and the user's DeepSpeed JSON: what would fail later fails here, as
one line naming the key, before any process starts."""
from __future__ import annotations

import json
import re
from pathlib import Path

from fsdp_ft.config.schema import Config, FinetuneConfig
from fsdp_ft.errors import ConfigError

def validate(cfg: Config) -> None:
    """Cross-field checks the types alone cannot express."""
    if not cfg.output_dir:
        raise ConfigError("config key 'output_dir' is required (where the run directory goes)")
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required")
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is required")
    if not re.fullmatch(r"none|full|auto|selective:[1-9]\d*", cfg.activation_checkpointing):
        raise ConfigError("config key 'activation_checkpointing' must be none, full, auto or selective:K with "
                          f"K >= 1, got {cfg.activation_checkpointing!r}")
    for key in ("micro_batch_size", "grad_accum", "global_batch_size", "seq_len", "epochs", "log_every",
                "keep_last"):
        value = getattr(cfg.train, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1")
    if cfg.fsdp.memory_budget_gib is not None and not cfg.fsdp.memory_budget_gib > 0:
        raise ConfigError(f"config key 'fsdp.memory_budget_gib' must be > 0 (or null), got "
                          f"{cfg.fsdp.memory_budget_gib}")
    for key in ("max_steps", "eval_every", "save_every"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"config key 'train.{key}' must be >= 0")
    steps = cfg.train.profile_steps
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        raise ConfigError(f"config key 'train.profile_steps' must be [start, end] with 1 <= start <= end, got {steps}")
    if cfg.train.peak_flops is not None and cfg.train.peak_flops <= 0:
        raise ConfigError("config key 'train.peak_flops' must be > 0 (or null)")
    if not cfg.train.fp16_init_scale > 0:
        raise ConfigError(f"config key 'train.fp16_init_scale' must be > 0, got {cfg.train.fp16_init_scale}")
    if cfg.fsdp.hybrid_replicas is not None and cfg.fsdp.hybrid_replicas < 1:
        raise ConfigError("config key 'fsdp.hybrid_replicas' must be >= 1")
    quant = cfg.finetune.quant
    for key in ("block_size", "scaler_block_size"):
        if getattr(quant, key) != "auto" and getattr(quant, key) < 1:
            raise ConfigError(f"config key 'finetune.quant.{key}' must be >= 1, got {getattr(quant, key)}")
    if cfg.fsdp.prefetch < 0:
        raise ConfigError(f"config key 'fsdp.prefetch' must be >= 0, got {cfg.fsdp.prefetch}")
    if not 0.0 <= cfg.data.eval_share < 1.0:
        raise ConfigError("config key 'data.eval_share' must be in [0, 1)")
    _validate_preference(cfg)
    _validate_data(cfg)
    _validate_engine(cfg)
    for key in ("setup_timeout_minutes", "timeout_minutes"):
        if not getattr(cfg.dist, key) > 0:
            raise ConfigError(f"config key 'dist.{key}' must be > 0 minutes, got {getattr(cfg.dist, key)}")
    if cfg.train.best_metric and not cfg.data.eval and cfg.data.eval_share == 0:
        raise ConfigError("config key 'train.best_metric' needs eval data: set data.eval or data.eval_share")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("config key 'optim.betas' must be a list of two numbers")
    if cfg.finetune.method == "full" and _partial_options_set(cfg.finetune):
        raise ConfigError("config key 'finetune.method' is 'full' but partial options are set; use finetune.method=partial")
    for key in ("trainable_regex", "frozen_regex"):
        for pattern in getattr(cfg.finetune, key):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config key 'finetune.{key}' has an invalid regex {pattern!r}: {e}") from None


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if not 0.0 <= d.max_drop_share <= 1.0:
        raise ConfigError("config key 'data.max_drop_share' must be in [0, 1]")
    if d.packing and cfg.task != "causal_lm":
        raise ConfigError(f"config key 'data.packing' works with task causal_lm only, not {cfg.task!r}")
    if d.packing and cfg.finetune.method in ("prefix", "prompt", "p_tuning"):
        raise ConfigError(f"config key 'data.packing' cannot be used with finetune.method={cfg.finetune.method}: "
                          "virtual tokens shared by a packed row would let its samples attend to each other")


def _validate_preference(cfg: Config) -> None:
    p = cfg.preference
    if p.beta <= 0:
        raise ConfigError("config key 'preference.beta' must be > 0")
    if not 0.0 <= p.label_smoothing < 0.5:
        raise ConfigError("config key 'preference.label_smoothing' must be in [0, 0.5)")
    if p.label_smoothing and p.loss_type != "sigmoid":
        raise ConfigError(f"config key 'preference.label_smoothing' applies to preference.loss_type=sigmoid only, "
                          f"not {p.loss_type}; set it to 0")
    if p.orpo_lambda < 0:
        raise ConfigError("config key 'preference.orpo_lambda' must be >= 0")
    if p.simpo_beta <= 0:
        raise ConfigError("config key 'preference.simpo_beta' must be > 0")
    if p.simpo_gamma < 0:
        raise ConfigError("config key 'preference.simpo_gamma' must be >= 0")
    if cfg.task in ("dpo", "orpo", "simpo", "reward") and p.chosen_column == p.rejected_column:
        raise ConfigError("config keys 'preference.chosen_column' and 'preference.rejected_column' must differ")
    if cfg.task == "reward" and cfg.model.num_labels not in (None, 1):
        raise ConfigError("config key 'model.num_labels' must be 1 (or null) for task 'reward': one scalar score")


DEEPSPEED_METHODS = ("full", "partial", "lora", "dora", "ia3")


def _validate_engine(cfg: Config) -> None:
    """What engine deepspeed cannot run fails here, before any process starts."""
    if cfg.engine != "deepspeed":
        return
    if cfg.finetune.method not in DEEPSPEED_METHODS:
        raise ConfigError(f"config key 'finetune.method'={cfg.finetune.method} is not available with engine "
                          f"deepspeed (it runs {', '.join(DEEPSPEED_METHODS)}); use engine=fsdp")
    if cfg.train.compile:
        raise ConfigError("config key 'train.compile' works with engine fsdp only; set train.compile=false")
    if cfg.fsdp.hybrid_replicas not in (None, 1):
        raise ConfigError("config key 'fsdp.hybrid_replicas' is FSDP-only; with engine deepspeed use ZeRO++ "
                          "(zero_hpz_partition_size) in deepspeed.config")
    read_user_config(cfg.deepspeed.config)


def _partial_options_set(ft: FinetuneConfig) -> bool:
    return bool(ft.freeze_embeddings or ft.freeze_first_n_blocks or ft.head_only or ft.trainable_regex
                or ft.frozen_regex)


REJECTED_SECTIONS = {"optimizer": "optim.*", "scheduler": "optim.schedule / optim.warmup_steps"}
STAGES = (2, 3)


def read_user_config(path: str | None) -> dict:
    """The user's DeepSpeed JSON (deepspeed.config), checked for what we cannot honour."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'deepspeed.config': '{path}' " + ("is not a file" if p.exists()
                                                                         else "does not exist"))
    try:
        tree = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        where = f" line {e.lineno}" if hasattr(e, "lineno") else ""
        raise ConfigError(f"config key 'deepspeed.config': '{path}'{where} is not valid JSON: "
                          f"{getattr(e, 'msg', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config key 'deepspeed.config': '{path}' must hold a JSON object")
    for section, ours in REJECTED_SECTIONS.items():
        if section in tree:
            raise ConfigError(f"config key 'deepspeed.config': '{path}' sets '{section}'; fsdp_ft builds it from "
                              f"{ours} so both engines train alike: remove the '{section}' section")
    stage = tree.get("zero_optimization", {}).get("stage", "auto")
    if stage != "auto" and stage not in STAGES:
        raise ConfigError(f"config key 'deepspeed.config': '{path}' sets zero_optimization.stage={stage!r}; "
                          f"engine deepspeed runs ZeRO stage 2 or 3")
    return tree
