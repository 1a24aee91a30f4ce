"""The run config's schema: one dataclass per section, each field with its default, help text and allowed values.

One schema serves loading, validation, `fsdp-ft train --help` and the resolved `config.yaml` in the run dir, so a
key documented in help is exactly a key the loader accepts."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

DTYPES = ("fp32", "bf16", "fp16")
# torch's and transformers' names for the same dtypes, so a config copied from an HF recipe loads; a dtype key keeps
# the short name, so config.yaml and the run's fingerprint never depend on the spelling
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DTYPE_ALIASES = {**DTYPE_NAMES, **{f"torch.{name}": short for name, short in DTYPE_NAMES.items()},
                 "torch.float": "fp32"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")


def _f(default, help: str, choices: tuple | None = None, path: bool = False):
    """A dataclass field carrying its help text, allowed values, and whether it is a filesystem path."""
    meta = {"help": help, "choices": choices, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("", "HF model folder, hub id, folder holding a GGUF file, or a folder with config.json for random init",
                   path=True)
    gguf_file: Optional[str] = _f(None, "GGUF file name inside model.path (weights are dequantized on load)")
    random_init: bool = _f(False, "build random weights from model.path/config.json instead of loading weights")
    dtype: str = _f("fp32", "storage dtype of the parameters (and optimizer state)", DTYPES)
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) when model.path is a hub id")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the model folder; off unless you trust it")
    attn_implementation: Optional[str] = _f("sdpa", "attention kernel: sdpa, eager, flash_attention_2 (null: HF default)")
    block_classes: list[str] = _f([], "class names of the transformer blocks to shard/checkpoint; empty: discover")
    num_labels: Optional[int] = _f(None, "classification labels; null: taken from the data")


@dataclass
class DataConfig:
    train: str = _f("", "training data: a .jsonl/.json/.csv/.parquet file or a hub dataset id", path=True)
    eval: Optional[str] = _f(None, "evaluation data (same formats); null: none, or carve data.eval_share of train",
                             path=True)
    train_split: str = _f("train", "split name when data.train is a hub dataset")
    eval_split: str = _f("validation", "split name when data.eval is a hub dataset")
    eval_share: float = _f(0.0, "share of the training rows held out for eval when data.eval is null (0: none)")
    text_column: str = _f("text", "column holding the text")
    text_pair_column: Optional[str] = _f(None, "second text column for pair classification")
    label_column: str = _f("label", "column holding the class label (seq_cls)")
    max_eval_samples: Optional[int] = _f(None, "use at most this many eval rows")
    format: str = _f("auto", "causal_lm row format: text, prompt_completion, chat ({role, content} messages), alpaca "
                     "(instruction/input/output), sharegpt ({from, value} turns); auto: from the columns "
                     "(docs/data.md)", ("auto", "text", "prompt_completion", "chat", "alpaca", "sharegpt"))
    prompt_column: str = _f("prompt", "prompt_completion: column holding the prompt")
    completion_column: str = _f("completion", "prompt_completion: column holding the completion")
    messages_column: Optional[str] = _f(None, "chat / sharegpt: column holding the message list; null: messages "
                                        "(chat), conversations (sharegpt)")
    loss_on: str = _f("completion", "causal_lm tokens that carry loss: completion (answers / assistant turns, "
                      "end-of-turn included) or all", ("completion", "all"))
    truncation: str = _f("keep_completion", "rows longer than train.seq_len: keep_completion (cut the prompt from "
                         "the left, then the end), keep_start (cut the end), drop (drop and count)",
                         ("keep_completion", "keep_start", "drop"))
    packing: bool = _f(False, "causal_lm: pack short training rows into rows of train.seq_len (no attention "
                       "across samples; train.micro_batch_size then counts packed rows)")
    max_drop_share: float = _f(0.05, "fail when more than this share of a split's rows would be dropped (empty "
                               "text, no answer, unknown eval label, too long under truncation=drop)")


@dataclass
class PreferenceConfig:
    prompt_column: str = _f("prompt", "dpo/orpo/simpo/reward: column holding the prompt (a string; with chat-list data "
                                      "optional shared turns)")
    chosen_column: str = _f("chosen", "dpo/orpo/simpo/reward: preferred response (a string, or a chat message list "
                                      "ending in the assistant turn)")
    rejected_column: str = _f("rejected", "dpo/orpo/simpo/reward: dispreferred response (same form as the chosen one)")
    beta: float = _f(0.1, "dpo: strength of the tie to the reference model (implicit reward = beta x log-ratio)")
    loss_type: str = _f("sigmoid", "dpo: sigmoid (DPO's loss), ipo (IPO: (margin - 1/(2 beta))^2 on log-ratios "
                        "averaged over each response's tokens), hinge (SLiC: max(0, 1 - beta x margin)); margin = "
                        "chosen log-ratio - rejected log-ratio", ("sigmoid", "ipo", "hinge"))
    label_smoothing: float = _f(0.0, "dpo, loss_type sigmoid: assumed share of wrongly ranked pairs (conservative "
                                "DPO); 0: plain DPO")
    orpo_lambda: float = _f(0.1, "orpo: weight of the odds-ratio term beside the NLL of the chosen response")
    simpo_beta: float = _f(2.0, "simpo: scale of the reward, beta x the response's mean token log-probability")
    simpo_gamma: float = _f(1.0, "simpo: target margin between the chosen and the rejected reward")


@dataclass
class LoraConfig:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: list[str] = _f([], "names of the modules to adapt (e.g. [q_proj, v_proj]); empty: every linear layer but the head")
    target_parameters: list[str] = _f([], "parameters to adapt beside target_modules (peft's LoRA on a tensor: "
                                      "one low-rank update per expert of a mixture-of-experts tensor), e.g. "
                                      "[experts.gate_up_proj, experts.down_proj]; empty: peft's choice, which with "
                                      "target_modules empty adapts the MoE experts and routers too")
    bias: str = _f("none", "which biases train", ("none", "all", "lora_only"))
    modules_to_save: list[str] = _f([], "modules trained in full beside the adapters (a classifier head is added by itself)")
    rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")


@dataclass
class QuantConfig:
    type: str = _f("nf4", "data type of the frozen base: nf4 (4-bit, the QLoRA code book), fp4 (4-bit, "
                   "bitsandbytes' FP4 code book), int8 (LLM.int8's row-wise absmax int8); all sharded by FSDP2",
                   ("nf4", "fp4", "int8"))
    block_size: int = _f(64, "weights per 4-bit block (nf4, fp4)")
    scaler_block_size: Union[int, str] = _f("auto", "scales per double-quantization block (nf4, fp4; scales are "
                                            "always stored in 8 bits); auto: per weight, the largest divisor <= 256 "
                                            "of its blocks per row, so any number of ranks can shard it and the "
                                            "quantized base is the same bits on 1, 2, 4... ranks", ("auto",))


@dataclass
class PromptConfig:
    num_virtual_tokens: int = _f(20, "prefix / prompt / p_tuning: virtual tokens prepended")
    encoder_hidden_size: int = _f(128, "p_tuning: hidden size of the prompt encoder MLP")


@dataclass
class FinetuneConfig:
    method: str = _f("full", "what trains: full, partial, or a PEFT method",
                     ("full", "partial", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "p_tuning"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "lora"})
    quant: QuantConfig = field(default_factory=QuantConfig, metadata={"help": "quant"})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"help": "prompt"})
    freeze_embeddings: bool = _f(False, "partial: freeze the input embeddings (and position embeddings)")
    freeze_first_n_blocks: int = _f(0, "partial: freeze the first N transformer blocks")
    head_only: bool = _f(False, "partial: train only the output head (LM head or classifier)")
    trainable_regex: list[str] = _f([], "partial: only parameters whose name matches one of these regexes train")
    frozen_regex: list[str] = _f([], "partial: parameters whose name matches one of these regexes are frozen")


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = _f(True, "free gathered block weights after forward (ZeRO-3); false: keep (ZeRO-2)")
    shard_frozen: Optional[bool] = _f(None, "false: keep frozen weights (a LoRA base, frozen blocks) whole on every "
                                      "rank, in the compute dtype: no all-gathers for them, at the memory of the "
                                      "whole frozen model per rank (a QLoRA base stays sharded); null (auto): whole "
                                      "for a PEFT method's base when it takes at most a quarter of a rank's device "
                                      "memory, else sharded")
    gather_once_per_step: bool = _f(False, "keep block weights gathered from the step's first forward to its last "
                                    "backward: one all-gather per optimizer step instead of two per micro-batch "
                                    "(holds the unsharded weights all step)")
    prefetch: int = _f(1, "blocks whose weights are all-gathered ahead, in forward and in backward, while the "
                       "current block computes (FSDP2's explicit prefetching; each costs one more gathered block "
                       "of memory); 0: forward gathers each block when it starts (FSDP2's default on CPU, where "
                       "its implicit prefetch needs CUDA streams)")
    gloo_async_reduce: bool = _f(True, "CPU ranks (gloo): reduce each block's gradients without copies and "
                                 "asynchronously (2 ranks swap halves, more all-reduce in place), overlapping the "
                                 "next block's backward; 2 ranks also all-gather by swapping halves in place; every "
                                 "such buffer is reused from step to step; with every weight whole on every rank "
                                 "(replicas x 1 shard) the gradients are all-reduced asynchronously instead of by "
                                 "FSDP's blocking HSDP all-reduce; false: torch's gloo collectives (copies and a "
                                 "blocking all-reduce per block)")
    hybrid_replicas: Optional[int] = _f(None, "replicate groups for hybrid sharding (2-D mesh replicas x shards); "
                                        "1: full sharding; null (auto): every rank holds every weight (replicas = "
                                        "ranks: no all-gathers, one all-reduce of each block's gradients) when the "
                                        "frozen base stays whole (fsdp.shard_frozen) and the trainable weights with "
                                        "their gradients and AdamW state take at most 5% of a rank's device memory, "
                                        "else 1")
    cpu_offload: Union[bool, str] = _f(False, "keep sharded parameters, gradients and optimizer state in host "
                                       "memory; auto: only when the planner predicts the run does not fit the "
                                       "device otherwise (decided at start, shown in the set-up row, recorded in "
                                       "config.yaml; false on CPU ranks)", ("auto",))
    memory_budget_gib: Optional[float] = _f(None, "device memory per rank that activation_checkpointing=auto and "
                                            "fsdp.cpu_offload=auto plan for (the planner keeps 10% headroom), and "
                                            "that null shard_frozen / hybrid_replicas decide by; "
                                            "null: the rank's GPU memory, on CPU ranks the host RAM divided by "
                                            "the ranks on the node")
    mixed_precision: str = _f("auto", "compute precision: bf16, fp16 or fp32; auto: bf16 on CUDA GPUs that compute "
                              "bf16 natively (Ampere and later), fp32 elsewhere (CPU, older GPUs), resolved when the "
                              "run starts (the run directory's config.yaml records the result)", ("auto",) + DTYPES)
    param_dtype: Optional[str] = _f(None, "dtype blocks compute in; null: from fsdp.mixed_precision", DTYPES + (None,))
    reduce_dtype: Optional[str] = _f(None, "dtype of gradient reduction; null: fp32", DTYPES + (None,))


@dataclass
class DeepSpeedConfig:
    stage: Optional[int] = _f(None, "engine deepspeed: ZeRO stage 2 (shard optimizer state and gradients) or 3 (also "
                              "parameters); null: the stage in deepspeed.config, else 3", (2, 3, None))
    config: Optional[str] = _f(None, "engine deepspeed: a DeepSpeed JSON merged over the config built from these keys "
                               "(batch sizes must agree or be \"auto\"; no optimizer/scheduler sections)", path=True)


@dataclass
class OptimConfig:
    lr: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(0, "linear warmup steps from 0 to optim.lr")
    schedule: str = _f("cosine", "decay after warmup", ("cosine", "linear", "constant"))
    min_lr_ratio: float = _f(0.0, "final learning rate as a share of optim.lr (cosine, linear)")
    max_grad_norm: Optional[float] = _f(1.0, "clip the global gradient norm to this; null: no clipping")
    implementation: str = _f("auto", "AdamW kernel: auto (fused, on CPU too), fused, foreach, for_loop",
                             ("auto", "fused", "foreach", "for_loop"))


@dataclass
class TrainConfig:
    max_steps: int = _f(0, "optimizer steps to run; 0: train.epochs full passes")
    epochs: int = _f(1, "passes over the training data when train.max_steps is 0")
    micro_batch_size: int = _f(1, "samples per rank per forward/backward")
    grad_accum: Optional[int] = _f(None, "micro-batches per optimizer step (global batch = micro x accum x "
                                   "data-parallel ranks); null: 1, or derived from train.global_batch_size")
    global_batch_size: Optional[int] = _f(None, "samples per optimizer step over all ranks; train.grad_accum is then "
                                          "derived for the ranks at hand (global / (micro x ranks); refused when "
                                          "it does not divide), so one config trains alike on 1 or N GPUs; null: "
                                          "micro x accum x ranks")
    seq_len: int = _f(512, "tokens per sample; longer samples are truncated")
    chunked_head_loss: bool = _f(True, "causal LM: run the LM head and its loss a chunk of tokens at a time on the "
                                 "labelled tokens only, never holding the full logits (models whose head is a plain "
                                 "linear layer; others, and engine: deepspeed, use the plain logits)")
    seed: int = _f(0, "seed for initialization, data order and dropout")
    log_every: int = _f(10, "write a metrics row every N steps")
    eval_every: int = _f(0, "evaluate every N steps (0: at each epoch end); always at the end")
    eval_batch_size: Optional[int] = _f(None, "samples per rank per eval batch; null: train.micro_batch_size")
    save_every: int = _f(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept on disk (older ones are deleted; the best one is always kept)")
    best_metric: Optional[str] = _f(None, "eval metric that picks the best checkpoint (e.g. accuracy, f1_macro, loss): "
                                    "each eval saves a checkpoint and final/ is the best; null: final/ is the last")
    best_mode: str = _f("auto", "max or min of train.best_metric is best; auto: min for loss/perplexity, else max",
                        ("auto", "max", "min"))
    progress_bar: bool = _f(True, "show a progress bar on rank 0")
    tensorboard: bool = _f(False, "also write TensorBoard event files to output_dir/tensorboard")
    profile_steps: list[int] = _f([], "[start, end]: write torch.profiler traces of these optimizer steps (1-based, "
                                  "inclusive) to output_dir/profile/ on every rank; empty: no profiling")
    tune_host_malloc: bool = _f(True, "glibc: keep big freed buffers in the heap (fixed 32 MiB mmap threshold, no "
                                "trimming) so steps on the host skip page faults; false: glibc's defaults")
    track_memory: bool = _f(False, "log the peak of live tensor bytes per rank (peak_tensor_bytes_per_rank; counted "
                            "by torch's MemTracker, slower): on CPU the stand-in for max_memory_allocated")
    peak_flops: Optional[float] = _f(None, "peak FLOP/s of one rank's device for MFU; null: the GPU's data-sheet "
                                     "peak, or measured once with a large matmul (CPU) and cached")
    compile: bool = _f(False, "torch.compile each transformer block (inductor; before sharding, after activation "
                       "checkpointing): faster blocks after a compile of tens of seconds at start, once more when "
                       "row lengths first vary (then for any length); engine fsdp only")
    fp16_init_scale: float = _f(65536.0, "fp16 compute: the first loss scale (halved on each step whose gradients "
                                "overflow, which is then skipped; doubled after 2000 clean steps)")
    tf32: bool = _f(True, "GPUs with TF32 (Ampere and newer): fp32 matmuls and convolutions use TF32 tensor cores "
                    "(10-bit mantissa; what an fp32 run or fp32 parts of a mixed-precision run compute in); false: "
                    "IEEE fp32. No effect on CPU")
    prefetch_batches: Optional[bool] = _f(None, "build the next step's batches in a background thread while this "
                                          "step computes (on GPU in pinned memory, copied asynchronously); null: "
                                          "on for GPUs, off for CPU ranks (there the thread would take a core "
                                          "from the step)")


@dataclass
class DistConfig:
    setup_timeout_minutes: float = _f(120.0, "process-group timeout from the rendezvous to the first step and again "
                                      "after the last (final export): a rank waits this long in a collective for "
                                      "the others, e.g. while rank 0 prepares the data or fingerprints the run, "
                                      "before the job is aborted")
    timeout_minutes: float = _f(30.0, "process-group timeout during training (steps, eval, checkpoint saves): a "
                                "collective waiting longer (a hung or dead rank) aborts the job, with an NCCL "
                                "flight-recorder dump in output_dir/logs/ on GPUs; shorter finds hangs sooner")


@dataclass
class WandbConfig:
    project: Optional[str] = _f(None, "Weights & Biases project: rank 0 logs every train and eval row, the resolved "
                                "config and the set-up facts to a W&B run whose id is the run's, so a resume "
                                "continues it (pip install 'fsdp_ft[wandb]'); null: no W&B")
    entity: Optional[str] = _f(None, "W&B team or user; null: your default entity")
    name: Optional[str] = _f(None, "W&B run name; null: output_dir's folder name")
    group: Optional[str] = _f(None, "W&B group; null: none, or the study's name for the trials of `fsdp-ft tune`")
    tags: list[str] = _f([], "W&B tags")
    mode: str = _f("auto", "online, or offline (files in output_dir/wandb/, uploaded later with `wandb sync`; for "
                   "nodes without internet); auto: W&B's own choice (WANDB_MODE, `wandb offline`), else online",
                   ("auto", "online", "offline"))


@dataclass
class Config:
    output_dir: str = _f("", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/", path=True)
    engine: str = _f("fsdp", "training engine: fsdp (FSDP2) or deepspeed (ZeRO-2/3; pip install 'fsdp_ft[deepspeed]')",
                     ("fsdp", "deepspeed"))
    task: str = _f("causal_lm", "training objective", ("causal_lm", "seq_cls", "dpo", "orpo", "simpo",
                                                         "reward"))
    resume: str = _f("auto", "auto: continue the run in output_dir from its newest valid checkpoint (refused if "
                     "output_dir holds a run with another identity; README: the run directory); none: a fresh "
                     "run (refused if output_dir already holds a run); or a checkpoint path", path=True)
    overwrite: bool = _f(False, "a fresh run may replace a run in output_dir that it cannot continue (resume=none, "
                         "or resume=auto with another identity): the old run is moved aside to "
                         "<output_dir>.replaced-<time>, never deleted")
    activation_checkpointing: str = _f("none", "recompute block activations: none, full, or selective:K (every "
                                       "K-th); auto: the cheapest of none, selective:2, full that the planner "
                                       "predicts fits fsdp.memory_budget_gib (decided at start, shown in the set-up "
                                       "row, recorded in config.yaml)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={"help": "preference"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "finetune"})
    fsdp: FSDPConfig = field(default_factory=FSDPConfig, metadata={"help": "fsdp"})
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata={"help": "deepspeed"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optim"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "train"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "dist"})
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"help": "wandb"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- schema walking

def is_dtype_key(f: dataclasses.Field) -> bool:
    """A key whose allowed values include every dtype name takes the dtype aliases too."""
    return set(DTYPES) <= set(f.metadata.get("choices") or ())


def canonical_dtype(value: Any) -> Any:
    """`float32`, `torch.bfloat16`, `BF16` ... -> the short name; anything else unchanged (the choice check then
    refuses it)."""
    if not isinstance(value, str):
        return value
    name = value.strip().lower()
    return name if name in DTYPES else DTYPE_ALIASES.get(name, value)


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def hints_of(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field, Any]]:
    """Every leaf key as (dotted name, type, field, default) in declaration order."""
    out = []
    hints = hints_of(cls)
    for name, f in fields_of(cls).items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            out += all_keys(t, f"{prefix}{name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((prefix + name, t, f, default))
    return out


