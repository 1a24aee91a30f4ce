"""Peer run for the benchmark: transformers' Trainer with FSDP2 (through accelerate), DeepSpeed ZeRO-2/3, or DDP.

Launched by benchmarks/run.py under torchrun with one argument, a spec JSON the harness wrote. The spec fixes
what must equal fsdp_ft's run: the saved model folder (same initial weights), the token ids of every sample in
the order fsdp_ft's batch plan uses them, batch shape, steps, optimizer hyper-parameters, precision, and the
LoRA rank/alpha/targets. Samples are fed in that order (sequential sampler; accelerate gives rank r the micro-
batches r, r + N, ... which is how fsdp_ft slices a global batch), so every system sees the same micro-batches
at the same step. Each rank writes rank-R.json (step times, tokens, peak memory); rank 0 adds the losses.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_timing import StepProfile, StepTimer, write_rank_result  # noqa: E402

BACKENDS = ("fsdp2", "zero2", "zero3", "ddp")


class FixedSamples(Dataset):
    """Token id rows already of equal length: no padding, labels = inputs (the model shifts them)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def deepspeed_config(stage: int) -> dict:
    """ZeRO stage 2 or 3; everything else is 'auto' so it follows TrainingArguments (batch, clip, bf16)."""
    return {"zero_optimization": {"stage": stage, "overlap_comm": False},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def training_arguments(spec: dict):
    from transformers import TrainingArguments

    backend, bf16 = spec["backend"], spec["precision"] == "bf16"
    kwargs = {}
    if backend == "fsdp2":
        kwargs.update(fsdp="full_shard auto_wrap",
                      fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [spec["block_class"]],
                                   "reshard_after_forward": spec.get("reshard_after_forward", True)})
    elif backend in ("zero2", "zero3"):
        kwargs["deepspeed"] = deepspeed_config(int(backend[-1]))
    if not torch.cuda.is_available():
        kwargs["ddp_backend"] = "gloo"
        if backend in ("zero2", "zero3"):
            # TrainingArguments starts DeepSpeed without a backend; on CPU accelerate then counts one process and
            # every rank would read every batch. Start the state ourselves with gloo (DeepSpeed's CPU accelerator,
            # DS_ACCELERATOR=cpu, uses gloo when oneCCL is absent) and let the Trainer reuse it.
            from accelerate import PartialState

            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            PartialState(backend="gloo")
            kwargs["accelerator_config"] = {"use_configured_state": True}
            if bf16:  # TrainingArguments' bf16 check knows only GPUs (or use_cpu, which would drop DeepSpeed);
                # DeepSpeed's CPU accelerator does run bf16, so let the check pass for this run
                import transformers.training_args as ta

                ta.is_torch_bf16_gpu_available = lambda: True
        else:
            kwargs["use_cpu"] = True  # else accelerate does not see a multi-CPU run under torchrun
    return TrainingArguments(
        output_dir=str(Path(spec["result_dir"]) / "trainer"), per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["max_steps"], learning_rate=spec["lr"],
        warmup_steps=spec["warmup_steps"], lr_scheduler_type=spec["schedule"], weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"], bf16=bf16, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential",
        seed=spec["seed"], data_seed=spec["seed"], remove_unused_columns=False, **kwargs)


def enable_fsdp_on_cpu() -> None:
    """accelerate turns its FSDP plugin on only for accelerator device types; on CPU (MULTI_CPU) it silently trains
    with DDP instead. The process state is already set up (gloo, CPU device), so present it as a multi-device run
    while the Trainer builds its Accelerator: accelerate then takes its own FSDP2 path (fully_shard per block)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


def load_model(spec: dict):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": spec.get("attn_implementation") or "sdpa"}
    if spec["mode"] == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        # quant_storage in the compute dtype lets FSDP / ZeRO-3 shard the 4-bit weights with the other tensors
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    model.config.use_cache = False
    if spec["mode"] in ("lora", "qlora"):
        import peft

        if spec["mode"] == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lo = spec["lora"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"], target_modules=lo["target_modules"],
            bias="none", task_type="CAUSAL_LM"))
    return model


def describe_wrapping(trainer) -> str:
    """What actually wraps the model (FSDPModule blocks, DDP, a DeepSpeed engine), to prove the peer is what it
    claims to be."""
    from torch.distributed.fsdp import FSDPModule

    wrapped = trainer.model_wrapped
    sharded = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
    return f"{type(wrapped).__name__}" + (f", {sharded} FSDPModule(s)" if sharded else "")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["backend"] not in BACKENDS:
        raise SystemExit(f"unknown backend {spec['backend']!r}; one of {BACKENDS}")
    from transformers import Trainer

    args = training_arguments(spec)  # before the model: ZeRO-3 must see its config to load partitioned
    if spec["backend"] == "fsdp2" and not torch.cuda.is_available():
        enable_fsdp_on_cpu()
    model = load_model(spec)
    rows = json.loads(Path(spec["samples"]).read_text())
    timer = StepTimer()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)

    class TimedTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            timer.add_tokens(int(inputs["attention_mask"].sum()))  # counted locally: no extra collective
            return super().training_step(model, inputs, num_items_in_batch)

    rank = int(os.environ.get("RANK", "0"))
    callbacks = [timer] + ([StepProfile(spec["profile_step"], spec["result_dir"], rank)]
                           if spec.get("profile_step") else [])
    trainer = TimedTrainer(model=model, args=args, train_dataset=FixedSamples(rows), callbacks=callbacks)
    wrapping = describe_wrapping(trainer)
    trainer.train()
    result = timer.result(rank)
    result["optimizer"] = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                               else trainer.optimizer).__name__
    result["optim_name"] = str(args.optim)
    result["distributed_type"] = str(trainer.accelerator.distributed_type)
    result["wrapping"] = describe_wrapping(trainer) or wrapping
    if rank == 0:
        result["losses"] = {int(r["step"]): float(r["loss"]) for r in trainer.state.log_history if "loss" in r}
        result["trainable_params"] = trainable
    write_rank_result(spec["result_dir"], rank, result)
    # every rank past its last transfer before any tears gloo down: a finished 2-rank LoRA run aborted in teardown
    # ("terminate called without an active exception") and counted as failed
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
