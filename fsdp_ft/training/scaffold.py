"""The run both engines share, in order: decide what the run is (new or resumed), let the engine build, resume,
record the run, log the set-up row, train, save at the end, export final/. An engine supplies only what differs
(`Engine`): its process set-up, its build, how it loads a checkpoint, and the set-up facts it alone knows."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fsdp_ft.checkpoint import run_identity
from fsdp_ft.checkpoint.export import export_final
from fsdp_ft.config import Config, batch, dump_config
from fsdp_ft.errors import CheckpointError, ConfigError
from fsdp_ft.observability import memtrack
from fsdp_ft.observability.flops import FlopCounts
from fsdp_ft.observability.metrics import MetricsLogger, peak_host_rss_bytes
from fsdp_ft.observability.wandb_run import WandbRun
from fsdp_ft.quant import experts, quantize
from fsdp_ft.runtime import distributed, preemption, quiet
from fsdp_ft.training import trial_link
from fsdp_ft.training.optim import build_scheduler
from fsdp_ft.training.run_setup import RunData, log_main, open_run, rank_peak_flops, resumed_state
from fsdp_ft.training.trainer import Trainer, TrainState


@dataclass
class TrainResult:
    model: torch.nn.Module      # the trained model (engine deepspeed: DeepSpeed's engine around it)
    tokenizer: object
    state: TrainState
    output_dir: Path
    pruned_at: int | None = None  # a trial of a search that its pruner stopped at this step


@dataclass
class Built:
    """What an engine's build hands the run."""
    model: torch.nn.Module      # what the trainer steps: the FSDP-sharded model, or DeepSpeed's engine
    optimizer: torch.optim.Optimizer
    scaler: object | None       # fp16 loss scaling, else None
    data: RunData
    info: dict                  # the set-up row so far
    summary: str                # the one line logged before the first step
    extra_state: dict           # what every checkpoint's state.json carries for export (labels, chat tokens)
    files: dict[str, str] = field(default_factory=dict)   # written beside config.yaml by rank 0


class Engine(Protocol):
    """What differs between engines. `start` sets up the process (group, precision resolved for the device, TF32);
    `build` makes data, model and optimizer; `load` restores weights and optimizer from a checkpoint and returns the
    rest of what was saved; `after_setup` gives set-up row entries known only once resumed."""
    trainer_class: type[Trainer]
    tracks_memory: bool  # train.track_memory is honoured

    def start(self, cfg: Config) -> tuple[Config, distributed.DistEnv, bool]: ...

    def build(self, cfg: Config, env: distributed.DistEnv) -> Built: ...

    def load(self, path: Path, built: Built, env: distributed.DistEnv) -> dict: ...

    def after_setup(self, cfg: Config, env: distributed.DistEnv, built: Built) -> dict: ...


def config_sha256(cfg: Config) -> str:
    """What this rank trains with, as 16 hex digits: the set-up row lists every rank's, so a job whose ranks read
    different configs (a node with another file, a search trial's parameters) shows it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def check_auto_agrees(cfg: Config) -> None:
    """Every rank planned the auto settings alone, from the same inputs: all took the same choice, or every rank
    raises the same one-line error (GPUs of different memory could choose differently)."""
    choices = distributed.all_gather_object((cfg.activation_checkpointing, cfg.fsdp.cpu_offload))
    if len(set(choices)) > 1:
        raise ConfigError(f"activation_checkpointing / fsdp.cpu_offload = auto chose differently on the ranks "
                          f"(devices of different memory?): {choices}; set them explicitly, or set "
                          f"fsdp.memory_budget_gib")


def run(cfg: Config, engine: Engine, auto: dict | None = None) -> TrainResult:
    """Set up, build, resume, train and export `cfg` with `engine`, on every rank. `auto`: what the planner chose
    for the auto settings (`planner.autofit`), for the set-up row."""
    cfg, env, tf32_on = engine.start(cfg)  # precision resolved before the fingerprint and config.yaml record it
    if auto:
        check_auto_agrees(cfg)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.output_dir)
    started = open_run(cfg, env)
    tracker = _start_wandb(cfg, env, out, started.run_id)  # before the long build: a login problem shows at once
    t0 = time.perf_counter()
    built = engine.build(cfg, env)
    data, info = built.data, built.info
    scheduler = build_scheduler(built.optimizer, data.steps, cfg)
    state = TrainState()
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout; a resume restores the saved RNG state instead
    quantized_base = quantize.base_layout(built.model)
    if started.resume_from is not None:
        saved = engine.load(Path(started.resume_from), built, env)
        _require_same_quantized_base(saved, quantized_base, built.model, started.resume_from)
        scheduler.load_state_dict(saved.pop("scheduler"))
        if built.scaler is not None and saved.get("scaler"):
            built.scaler.load_state_dict(saved["scaler"])
        saved.pop("scaler", None)
        state = resumed_state(env, started, saved)
    info.update(engine.after_setup(cfg, env, built))
    state.run, state.extra, state.quantized_base = started.record(), built.extra_state, quantized_base
    if env.is_main:
        run_identity.record(out, started)
        dump_config(batch.portable(cfg), out / "config.yaml")
        for name, text in built.files.items():
            (out / name).write_text(text)
    peak, peak_source = rank_peak_flops(cfg, env)
    if auto:
        info["auto"] = auto
        for key, note in auto.items():
            if key not in ("planner_s", "planner_cached"):
                log_main(env, f"{key}={note}")
    info.update(run_id=started.run_id, resumed_from=started.resume_from, setup_s=time.perf_counter() - t0,
                world_size=env.world_size, device=str(env.device), backend=env.backend, peak_flops=peak,
                tf32=tf32_on, peak_flops_source=peak_source,
                host_rss_after_setup_per_rank=distributed.all_gather_object(peak_host_rss_bytes()),
                config_sha256_per_rank=distributed.all_gather_object(config_sha256(cfg)))
    log_main(env, built.summary)
    b = info["batch"]
    log_main(env, f"global batch {b['global']} = micro-batch {b['micro']} x accumulation {b['accum']} x "
                  f"{b['ranks']} rank(s) (from {b['from']})")
    logger = MetricsLogger(out, env.is_main, data.steps, cfg.train.tensorboard, cfg.train.progress_bar, state.step,
                           tracker)
    logger.log({"split": "setup", "step": state.step, **info})
    trainer = engine.trainer_class(cfg, env, built.model, data.task, built.optimizer, scheduler, built.scaler,
                                   data.splits.train, data.splits.eval, logger, state, data.plan, data.steps,
                                   peak_flops=peak,
                                   flop_counts=FlopCounts(**info["flop_counts"]) if info["flop_counts"] else None)
    trainer.saved_step = state.step if started.resumes_in_place(out) else None
    trainer.trial = trial_link.from_env(env.is_main)
    tracking = (memtrack.tracking(cfg.train.track_memory, built.model, built.optimizer) if engine.tracks_memory
                else contextlib.nullcontext())
    with tracking as trainer.mem_tracker, distributed.step_timeout():  # set-up and export wait longer
        state = trainer.fit()
        if state.step >= data.steps:  # resumed at its end from another folder's checkpoint: output_dir gets its own
            trainer.save()
    if env.is_main and state.step >= data.steps:  # a run stopped early (signal) exports when it resumes and ends
        logger.log({"split": "final", "step": state.step, **export_final(out, data.tokenizer)})
    logger.close(preemption.stop_signal())
    distributed.barrier()
    return TrainResult(model=built.model, tokenizer=data.tokenizer, state=state, output_dir=out,
                       pruned_at=trainer.pruned_at)


def _start_wandb(cfg: Config, env: distributed.DistEnv, out: Path, run_id: str) -> WandbRun | None:
    """Rank 0's W&B run when wandb.project is set; a failure to start stops every rank with the same line."""
    if not cfg.wandb.project:
        return None
    study = trial_link.study_name()
    return distributed.on_main(env.is_main, lambda: WandbRun.start(cfg, out, run_id, study, quiet.verbose()))


def _require_same_quantized_base(saved: dict, now: str | None, model: torch.nn.Module, path) -> None:
    """A QLoRA run continues only on the quantized base its adapters trained on. Checkpoints written before the
    base was recorded differ from today's only where MoE expert tensors were kept in full precision."""
    if "quantized_base" in saved:
        if saved["quantized_base"] == now:
            return
        why = "its base was quantized differently (another fsdp_ft version, or other finetune.quant settings)"
    elif any(hasattr(m, experts.SHAPES_ATTR) for m in model.modules()):
        why = "it was trained with this model's MoE expert tensors in full precision; QLoRA now stores them in 4 bits"
    else:
        return
    raise CheckpointError(f"checkpoint '{path}' cannot continue here: {why}, so its adapters would go on training on "
                          "another base; start a new run (another output_dir, or overwrite=true)")
