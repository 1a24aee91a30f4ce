"""The parts of set-up both engines use: check output_dir and decide what the run is (new or resumed), load and
check the data before any model is built, build the meta model, count FLOPs and the peak for MFU, log on rank 0.
`scaffold.run` puts them in order around each engine's own build and load."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


from fsdp_ft.checkpoint import run_identity
from fsdp_ft.config import Config, batch
from fsdp_ft.data.splits import BatchPlan, Splits, load_splits
from fsdp_ft.errors import ConfigError, DataError
from fsdp_ft.model import adapters, packing_check, vocab
from fsdp_ft.model.build import (build_meta_model, load_hf_config, load_tokenizer, refuse_sinks_under_cpu_flex,
                                  resolve_model_dir)
from fsdp_ft.model.trainable import apply_finetune
from fsdp_ft.observability.flops import FlopCounts, count_flops, peak_flops
from fsdp_ft.parallel import fsdp
from fsdp_ft.quant import quantize
from fsdp_ft.runtime import distributed, precision, quiet, tf32
from fsdp_ft.runtime.precision import DTYPE
from fsdp_ft.tasks import get_task
from fsdp_ft.training import best
from fsdp_ft.training.trainer import TrainState


@dataclass
class RunData:
    """The data side of a run, checked before any model is built."""
    model_dir: Path
    tokenizer: object
    task: object
    splits: Splits
    plan: BatchPlan
    steps: int                  # optimizer steps of the whole run
    labels: list[str] | None    # classification labels, else None


def prepare_output_dir(cfg: Config, env: distributed.DistEnv) -> Path:
    """Create output_dir and check it is writable before any expensive work."""
    out = Path(cfg.output_dir)
    distributed.on_main(env.is_main, lambda: _check_writable(out))
    return out


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config key 'output_dir': cannot write to '{out}': {e.strerror or e}") from None


def open_run(cfg: Config, env: distributed.DistEnv) -> run_identity.RunStart:
    """Check output_dir and decide what this run is (new, or which checkpoint it continues): rank 0 decides, and
    every rank gets the same decision or raises the same error."""
    prepare_output_dir(cfg, env)
    decision = distributed.broadcast_object(
        distributed.on_main(env.is_main, lambda: run_identity.decide(cfg, env.world_size)))
    for note in decision.notes:
        log_main(env, f"warning: {note}")
    return decision


def log_main(env, msg: str) -> None:
    if env.is_main:
        print(f"[fsdp_ft] {msg}", file=sys.stderr, flush=True)


ADAPTER_KIND = {"lora": "LoRA", "qlora": "LoRA", "dora": "DoRA", "ia3": "IA3"}
SHOWN_INITIALISED = 8


def log_initialised(env, cfg: Config, model, names: list[str]) -> None:
    """The tensors a run from pretrained weights did not find in the checkpoint. Adapters always start fresh, so
    they are counted, and buffers no checkpoint holds (rotary frequencies) are left out; anything else (a new head,
    a checkpoint that does not match the model) is named, as it may be a mistake. -v names every one."""
    if cfg.model.random_init or not names:
        return
    if quiet.verbose():
        log_main(env, f"initialised (not in checkpoint): {', '.join(names)}")
        return
    computed = {f"{m}.{b}" for m, module in model.named_modules() for b in module._non_persistent_buffers_set}
    names = [n for n in names if n not in computed]
    fresh = [n for n in names if not adapters.is_adapter(n)]
    if fresh:
        more = f" and {len(fresh) - SHOWN_INITIALISED} more (-v lists them)" if len(fresh) > SHOWN_INITIALISED else ""
        log_main(env, f"initialised (not in checkpoint): {', '.join(fresh[:SHOWN_INITIALISED])}{more}")
    if len(fresh) < len(names):
        kind = ADAPTER_KIND.get(cfg.finetune.method, "PEFT")
        log_main(env, f"{kind} adapters: {len(names) - len(fresh)} tensors initialised (-v lists them)")


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    if plan.steps_per_epoch == 0:
        raise DataError(f"data.train: '{cfg.data.train}' has {plan.num_samples} usable rows, fewer than one global "
                        f"batch of {plan.global_batch} (train.micro_batch_size={cfg.train.micro_batch_size} x "
                        f"train.grad_accum={cfg.train.grad_accum} x {plan.world_size} ranks)")
    return cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch


def batch_plan(cfg: Config, env: distributed.DistEnv, num_samples: int) -> BatchPlan:
    return BatchPlan(num_samples, cfg.train.micro_batch_size, cfg.train.grad_accum, env.world_size, env.rank,
                     cfg.train.seed)


def load_data(cfg: Config, env: distributed.DistEnv) -> RunData:
    """Tokenizer, task, splits, batch plan, step count and labels: all checked before any model is built."""
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    task = get_task(cfg, tokenizer)
    best.check_metric(cfg, task)
    with distributed.main_process_first(env):
        splits = load_splits(cfg, task)  # may give the tokenizer ChatML tokens (data.format chat, no template)
    plan = batch_plan(cfg, env, len(splits.train))
    steps = total_steps(cfg, plan)  # too little data fails here, before the model is built
    labels = task.labels(splits.train)
    return RunData(model_dir, tokenizer, task, splits, plan, steps, labels)


def note_unquantized_experts(env, cfg: Config, model) -> None:
    """QLoRA stores the expert stacks of transformers' decorated experts classes in 4 bits (`quant.experts`);
    3-D expert tensors of any other module (remote code, a transformers without that decorator) stay in the
    model's dtype, and they are most of such a model: say so, since the memory a user expects from "4-bit" is not
    what they get."""
    if cfg.finetune.method != "qlora":
        return
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() == 3 and not p.requires_grad and ".experts." in n)
    if experts:
        total = sum(p.numel() for p in model.parameters())
        log_main(env, f"QLoRA does not quantize this model's MoE expert tensors (not a transformers experts class): "
                      f"{experts:,} parameters, {experts / total:.0%} of the model, stay in {cfg.model.dtype} "
                      "(fsdp-ft plan counts them)")


def build_meta(cfg: Config, env: distributed.DistEnv, model_dir, tokenizer, labels, hf_config=None):
    """The model on the meta device, PEFT-wrapped (QLoRA base quantized) or with its frozen parts marked.
    `hf_config` replaces model.path's config (`fsdp-ft plan` simulates shorter stacks of blocks)."""
    hf_config = hf_config if hf_config is not None else load_hf_config(cfg, model_dir)
    model = build_meta_model(cfg, hf_config, tokenizer, labels)
    refuse_sinks_under_cpu_flex(model, env.device)
    if cfg.data.packing and not str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        packing_check.check(model)  # packed samples must not see each other
    if adapters.is_peft(cfg):
        model = adapters.wrap(model, cfg, vocab.added_chat_tokens(tokenizer), device=env.device)
        if cfg.finetune.method == "qlora":
            replicas, _ = fsdp.replicas_without_model(cfg, env.world_size)  # a QLoRA base is sharded
            quantize.quantize_meta_model(model, cfg, shards=env.world_size // replicas)
    else:
        apply_finetune(model, cfg, fsdp.find_blocks(model, cfg.model.block_classes))
        vocab.check_rows_train(model, cfg.finetune.method, vocab.added_chat_tokens(tokenizer))
    return model, hf_config


def count_flops_or_none(env, model) -> FlopCounts | None:
    """FLOPs for MFU; a model whose forward cannot run on fake tensors (data-dependent control flow, as in
    GPT-2's mask code) trains without an MFU column rather than not at all."""
    try:
        return count_flops(model)
    except Exception as e:  # the tracer's failure is not the user's: say so once and go on
        log_main(env, f"MFU not reported: counting this model's FLOPs on fake tensors failed ({type(e).__name__})")
        return None


def rank_peak_flops(cfg: Config, env: distributed.DistEnv) -> tuple[float, str]:
    """One rank's peak FLOP/s in the compute dtype, for MFU: train.peak_flops, the GPU's table entry, or measured."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops, "config: train.peak_flops"
    return peak_flops(env.device, DTYPE[precision.compute_precision(cfg)])


def resumed_state(env: distributed.DistEnv, run: run_identity.RunStart, saved: dict) -> TrainState:
    """The trainer state a checkpoint recorded (its other entries are the loader's)."""
    state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
    log_main(env, f"run {run.run_id}: resumed from {run.resume_from} at step {state.step}")
    return state


def start_process(cfg: Config) -> tuple[Config, distributed.DistEnv, bool]:
    """The process group and this rank's device; `cfg` with fsdp.mixed_precision=auto resolved for that device
    and train.grad_accum for the world size (before the fingerprint and config.yaml record them); TF32 set before
    any matmul and the MFU peak."""
    env = distributed.init_distributed(cfg.dist.setup_timeout_minutes, cfg.dist.timeout_minutes)
    cfg = precision.resolve_precision(cfg, env.device)
    cfg = batch.resolve(cfg, env.world_size)  # every rank of the job is data-parallel (fsdp_ft.config.batch)
    return cfg, env, tf32.apply(cfg.train.tf32, env.device)


def setup_info(cfg: Config, data: RunData, trainable: int, total: int, materialized: dict,
               flop_counts: FlopCounts | None) -> dict:
    """The set-up row's entries both engines log: what trains, the weights loaded, the rows, the steps, FLOPs."""
    splits = data.splits
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1),
            "weights_loaded": materialized["loaded"], "weights_initialised": len(materialized["initialised"]),
            "dropped_rows": splits.dropped, "train_rows": len(splits.train),
            "eval_rows": len(splits.eval) if splits.eval is not None else 0, "labels": data.labels,
            "total_steps": data.steps, "batch": batch.describe(cfg, data.plan.world_size),
            "flop_counts": flop_counts.to_dict() if flop_counts else None,
            "flops_per_token": flop_counts.per_token_at(cfg.train.seq_len) if flop_counts else None}


def trains_line(info: dict) -> str:
    """The start of the line logged before the first step: how much of the model trains."""
    return (f"{info['trainable_params']:,} of {info['total_params']:,} parameters train "
            f"({100 * info['trainable_share']:.2f}%)")
