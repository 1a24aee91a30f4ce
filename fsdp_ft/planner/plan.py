"""`fsdp-ft plan`: per-rank peak memory of a config before launch, and the cheapest settings that fit.

Each prediction is a simulated training step on fake tensors (`memsim`), so parameters, gradients, AdamW state,
sharding over the world size, hybrid replicas, 4-bit bases, PEFT, activation checkpointing, logits and the loss
are all counted the way the real run allocates them. Deep models are simulated with two short stacks of blocks
and extrapolated linearly in the block count (every block holds the same), which keeps a plan to seconds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from fsdp_ft.config import Config, batch, load_config
from fsdp_ft.errors import ConfigError
from fsdp_ft.observability.units import fmt_bytes
from fsdp_ft.planner import memsim
from fsdp_ft.runtime import precision

GIB = 2 ** 30
HEADROOM = 0.9  # a plan fits when its peak is at most 90% of the memory: allocator slack, CUDA context, NCCL
ORDER = ("params", "whole", "grads", "optimizer", "gathered", "gathered_grads", "activations", "other")
LABELS = {"params": "parameters (own shard) + buffers", "whole": "frozen base outside FSDP (whole per rank)",
          "grads": "gradients (own shard)", "optimizer": "optimizer state (AdamW, own shard)",
          "gathered": "gathered parameters (all-gather)", "gathered_grads": "unreduced gradients",
          "activations": "activations, logits, temporaries", "other": "other"}
HOST_GROUPS = ("params", "grads", "optimizer")  # where fsdp.cpu_offload keeps them on a GPU machine


@dataclass
class Prediction:
    overrides: list[str]
    world_size: int
    target: str
    train: dict[str, int]              # bytes by group at the forward/backward peak
    step: dict[str, int]               # bytes by group at the optimizer-step peak
    layers_simulated: list[int] = field(default_factory=list)
    offload: bool = False
    replicas: int = 1                  # fsdp.hybrid_replicas as training would resolve it

    def _device(self, groups: dict[str, int]) -> dict[str, int]:
        if self.offload and self.target == "cuda":
            return {k: v for k, v in groups.items() if k not in HOST_GROUPS}
        return groups

    @property
    def peak_phase(self) -> str:
        return "train" if sum(self._device(self.train).values()) >= sum(self._device(self.step).values()) else "step"

    @property
    def peak_groups(self) -> dict[str, int]:
        return getattr(self, self.peak_phase)

    @property
    def peak_bytes(self) -> int:
        """Device bytes at the peak (host RAM on CPU; with offload on a GPU, what stays on the GPU)."""
        return sum(self._device(self.peak_groups).values())

    @property
    def host_bytes(self) -> int:
        """With CPU offload on a GPU: the sharded state kept in host RAM."""
        if not (self.offload and self.target == "cuda"):
            return 0
        return max(sum(v for k, v in g.items() if k in HOST_GROUPS) for g in (self.train, self.step))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
                "host_bytes": self.host_bytes}


def _layer_count(hf_config) -> int:
    n = getattr(hf_config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError("fsdp-ft plan: the model config has no num_hidden_layers")
    return n


def _period(cfg: Config, hf_config) -> int:
    """Blocks after which the pattern of the stack repeats (checkpointing every K-th, alternating layer types)."""
    period = int(cfg.activation_checkpointing.split(":")[1]) if cfg.activation_checkpointing.startswith(
        "selective") else 1
    types = getattr(hf_config, "layer_types", None)
    if isinstance(types, list) and len(set(types)) > 1:
        period *= 2
    return period


def _extrapolate(a: dict[str, int], b: dict[str, int], la: int, lb: int, layers: int) -> dict[str, int]:
    keys = set(a) | set(b)
    return {k: max(0, round(a.get(k, 0) + (b.get(k, 0) - a.get(k, 0)) * (layers - la) / (lb - la))) for k in keys}


def predict(cfg: Config, model_dir, hf_config, tokenizer, world_size: int, target: str, overrides: list[str] = (),
            exact: bool = False, memory_per_rank: int | None = None) -> Prediction:
    """Peak bytes per rank of `cfg` on `world_size` ranks (`exact`: simulate every block, do not extrapolate;
    `memory_per_rank`: the device memory the null fsdp.shard_frozen and fsdp.hybrid_replicas decide by, default
    this machine's).
    Runs inside the caller's `memsim.fake_world`."""
    cfg = precision.resolve_precision(cfg, target)  # fsdp.mixed_precision=auto: what the target device would use
    cfg = batch.resolve(cfg, world_size)  # train.global_batch_size: the accumulation on these ranks
    cfg = memsim.resolve_auto(cfg, model_dir, hf_config, tokenizer, world_size, memory_per_rank)
    layers = _layer_count(hf_config)
    p = _period(cfg, hf_config)
    # two stacks a period apart, deep enough that each further block adds the same bytes: past the pool's
    # fixed number of blocks in flight where the run pools its communication buffers (memsim.pool_depth)
    first = p * max(2 if p == 1 else 1, math.ceil(memsim.pool_depth(cfg, world_size, target) / p))
    short = [first, first + p]
    if exact or layers <= short[1] or cfg.finetune.freeze_first_n_blocks > 0:
        peaks = memsim.simulate_step(cfg, model_dir, hf_config, tokenizer, world_size, target)
        train, step, simulated = peaks.train, peaks.step, [layers]
    else:
        a, b = (memsim.simulate_step(cfg, model_dir, memsim.with_layers(hf_config, n), tokenizer, world_size, target)
                for n in short)
        train = _extrapolate(a.train, b.train, *short, layers)
        step = _extrapolate(a.step, b.step, *short, layers)
        simulated = short
    return Prediction(overrides=list(overrides), world_size=world_size, target=target, train=train, step=step,
                      layers_simulated=simulated, offload=cfg.fsdp.cpu_offload, replicas=cfg.fsdp.hybrid_replicas)


# ---------------------------------------------------------------- advice

def candidates(cfg: Config, target: str) -> list[list[str]]:
    """Override sets to try, cheapest first (in lost speed): resharding, smaller micro-batches (same global
    batch), activation checkpointing, CPU offload, then changing what trains (LoRA, QLoRA). `cfg` has its
    train.grad_accum resolved (`batch.resolve`)."""
    t, out = cfg.train, []
    micro = []
    mb = t.micro_batch_size
    while mb > 1:
        mb //= 2
        # with train.global_batch_size set, the accumulation follows the micro-batch by itself
        accum = [] if t.global_batch_size else [f"train.grad_accum={t.grad_accum * t.micro_batch_size // mb}"]
        micro.append([f"train.micro_batch_size={mb}", *accum])
    base = [] if cfg.fsdp.reshard_after_forward else ["fsdp.reshard_after_forward=true"]
    if cfg.fsdp.gather_once_per_step:
        base.append("fsdp.gather_once_per_step=false")
    if cfg.fsdp.shard_frozen is not True:
        base.append("fsdp.shard_frozen=true")
    if base:
        out.append(base)
    out += [base + m for m in micro]
    if cfg.activation_checkpointing != "full":
        ac = base + ["activation_checkpointing=full"]
        out += [ac] + [ac + m for m in micro]
    else:
        ac = base
    if not cfg.fsdp.cpu_offload and target == "cuda":
        off = ac + ["fsdp.cpu_offload=true"]
        out += [off] + ([off + micro[-1]] if micro else [])
    if cfg.finetune.method in ("full", "partial"):
        out.append(ac + ["finetune.method=lora"] + (micro[-1] if micro else []))
    if cfg.finetune.method != "qlora":
        out.append(ac + ["finetune.method=qlora"] + (micro[-1] if micro else []))
    return out


def advise(config_path: str, overrides: list[str], model_dir, hf_config, tokenizer, world_size: int, target: str,
           budget_bytes: int, on_try=None, exact: bool = False) -> tuple[Prediction | None, list[Prediction]]:
    """The first candidate (cheapest first) whose peak fits HEADROOM x budget, and every prediction made."""
    cfg = batch.resolve(load_config(config_path, overrides), world_size)
    tried = []
    for extra in candidates(cfg, target):
        try:
            trial = load_config(config_path, [*overrides, *extra])
            pred = predict(trial, model_dir, hf_config, tokenizer, world_size, target, extra, exact, budget_bytes)
        except ConfigError as e:  # e.g. QLoRA block sizes that do not fit this model
            if on_try:
                on_try(extra, None, str(e))
            continue
        tried.append(pred)
        if on_try:
            on_try(extra, pred, None)
        if pred.peak_bytes <= HEADROOM * budget_bytes:
            return pred, tried
    return None, tried


# ---------------------------------------------------------------- auto settings
# activation_checkpointing=auto and fsdp.cpu_offload=auto: training resolves them at start (`planner.autofit`),
# `fsdp-ft plan` before it predicts

AUTO = "auto"
AC_ORDER = ("none", "selective:2", "full")


def has_auto(cfg: Config) -> bool:
    return cfg.activation_checkpointing == AUTO or cfg.fsdp.cpu_offload == AUTO


def options(cfg: Config, target: str) -> list[tuple[str, bool]]:
    """(activation_checkpointing, cpu_offload) pairs to try, cheapest first."""
    acs = AC_ORDER if cfg.activation_checkpointing == AUTO else (cfg.activation_checkpointing,)
    if cfg.fsdp.cpu_offload != AUTO:
        offloads = (cfg.fsdp.cpu_offload,)
    else:
        offloads = (False, True) if target == "cuda" else (False,)
    return [(ac, off) for off in offloads for ac in acs]


def with_choice(cfg: Config, ac: str, offload: bool) -> Config:
    return dataclasses.replace(cfg, activation_checkpointing=ac,
                               fsdp=dataclasses.replace(cfg.fsdp, cpu_offload=offload))


def device_memory(cfg: Config, target: str, local_rank: int) -> tuple[int, str]:
    """The bytes a rank plans for, and where the number comes from."""
    if cfg.fsdp.memory_budget_gib:
        return int(cfg.fsdp.memory_budget_gib * 2 ** 30), "fsdp.memory_budget_gib"
    if target == "cuda":
        import torch

        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)  # as init_distributed will: CUDA's first use here must not land on GPU 0
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"GPU {props.name}"
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return host // ranks, f"host RAM / {ranks} rank(s)"


def choose(cfg: Config, model_dir, hf_config, tokenizer, world: int, target: str,
           budget: tuple[int, str]) -> tuple[Config, dict]:
    """The first of `options` whose predicted peak fits HEADROOM x budget (bytes, source), else the last; and a
    note per auto key. Runs inside the caller's `memsim.fake_world`."""
    budget, source = budget
    too_big = []
    for ac, offload in options(cfg, target):
        # the budget is also the device memory the null fsdp.shard_frozen / hybrid_replicas decide by, as in
        # `fsdp-ft plan --gpu-mem-gb` (training decides those by the device's own memory)
        pred = predict(with_choice(cfg, ac, offload), model_dir, hf_config, tokenizer, world, target,
                       memory_per_rank=budget)
        if fits := pred.peak_bytes <= HEADROOM * budget:
            break
        too_big.append(f"{ac}{', offload' if offload else ''} {fmt_bytes(pred.peak_bytes)}")
    verdict = (f"plan {fmt_bytes(pred.peak_bytes)} of {fmt_bytes(budget)}, {source}, {HEADROOM:.0%} usable"
               + (f"; too big: {', '.join(too_big)}" if too_big and fits else "")
               + ("" if fits else "; nothing tried fits, so the most frugal setting: expect out-of-memory"))
    notes = {}
    if cfg.activation_checkpointing == AUTO:
        notes["activation_checkpointing"] = f"auto -> {ac} ({verdict})"
    if cfg.fsdp.cpu_offload == AUTO:
        why = verdict if target == "cuda" else "CPU ranks: the state is in host memory already"
        notes["fsdp.cpu_offload"] = f"auto -> {str(offload).lower()} ({why})"
    return with_choice(cfg, ac, offload), notes


# ---------------------------------------------------------------- output

def table(pred: Prediction) -> str:
    """The breakdown at both phases, the peak, and where it occurs."""
    rows = [("", "forward+backward", "optimizer step")]
    for key in ORDER:
        if pred.train.get(key, 0) or pred.step.get(key, 0):
            label = LABELS[key] + (" [host]" if pred.offload and pred.target == "cuda" and key in HOST_GROUPS
                                   else "")
            rows.append((label, fmt_bytes(pred.train.get(key, 0)), fmt_bytes(pred.step.get(key, 0))))
    rows.append(("total", fmt_bytes(sum(pred.train.values())), fmt_bytes(sum(pred.step.values()))))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows]
    lines.insert(1, "  " + "-" * (sum(width) + 4))
    where = "GPU" if pred.target == "cuda" else "host RAM (CPU training)"
    lines.append(f"predicted peak per rank: {fmt_bytes(pred.peak_bytes)} of {where}, during the "
                 f"{'forward/backward pass' if pred.peak_phase == 'train' else 'optimizer step'}")
    if pred.host_bytes:
        lines.append(f"host RAM per rank for the offloaded state: {fmt_bytes(pred.host_bytes)}")
    return "\n".join(lines)


def run_plan(config_path: str, overrides: list[str], world_size: int, target: str, budget_gib: float | None,
             as_json: bool = False, exact: bool = False) -> int:
    """The `fsdp-ft plan` command: print the table (or JSON) and, given a memory size, the advice."""
    from fsdp_ft.model.build import load_hf_config, load_tokenizer, resolve_model_dir

    cfg = load_config(config_path, overrides)
    if cfg.fsdp.hybrid_replicas is not None and world_size % cfg.fsdp.hybrid_replicas:
        raise ConfigError(f"config key 'fsdp.hybrid_replicas'={cfg.fsdp.hybrid_replicas} must divide the world "
                          f"size {world_size}")
    model_dir = resolve_model_dir(cfg)
    tokenizer = load_tokenizer(cfg, model_dir)
    hf_config = load_hf_config(cfg, model_dir)
    budget = int(budget_gib * GIB) if budget_gib else None
    with memsim.fake_world(world_size):
        if has_auto(cfg):  # what training would choose for this budget, then planned as any setting
            cfg, notes = choose(cfg, model_dir, hf_config, tokenizer, world_size, target,
                                (budget, "--gpu-memory-gib") if budget else _auto_budget(cfg, target))
            overrides = [*overrides, f"activation_checkpointing={cfg.activation_checkpointing}",
                         f"fsdp.cpu_offload={str(cfg.fsdp.cpu_offload).lower()}"]
            if not as_json:
                print("\n".join(f"{key}: {note}" for key, note in notes.items()))
        pred = predict(cfg, model_dir, hf_config, tokenizer, world_size, target, exact=exact, memory_per_rank=budget)
        fits = budget is None or pred.peak_bytes <= HEADROOM * budget
        advice, tried = (pred, []) if fits else advise(
            config_path, overrides, model_dir, hf_config, tokenizer, world_size, target, budget,
            on_try=None if as_json else _print_try(budget), exact=exact)
    if as_json:
        print(json.dumps({"prediction": pred.to_dict(), "budget_bytes": budget, "fits": fits,
                          "advice": advice.to_dict() if advice else None,
                          "tried": [t.to_dict() for t in tried]}))
        return 0
    shards = world_size // pred.replicas
    print(f"fsdp-ft plan: {config_path}; {world_size} rank(s) = {pred.replicas} replica(s) x {shards} "
          f"shard(s); micro-batch {cfg.train.micro_batch_size} x {cfg.train.seq_len} tokens; "
          f"finetune {cfg.finetune.method}; activation checkpointing {cfg.activation_checkpointing}; "
          f"target {target}")
    if cfg.engine != "fsdp":
        print(f"note: engine {cfg.engine} is planned as the fsdp engine (FSDP2 full sharding is ZeRO-3's layout)")
    print(table(pred))
    if budget is not None:
        print(_advice_text(pred, advice, budget, fits))
    return 0


def _auto_budget(cfg: Config, target: str) -> tuple[int, str]:
    if target == "cuda" and not cfg.fsdp.memory_budget_gib:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("fsdp-ft plan: the auto settings on a GPU need its memory: give --gpu-memory-gib "
                              "or fsdp.memory_budget_gib")
    return device_memory(cfg, target, 0)


def _print_try(budget: int):
    def show(extra, pred, error):
        what = " ".join(extra) or "(as configured)"
        if pred is None:
            print(f"  try {what}: not possible ({error})")
        else:
            verdict = "fits" if pred.peak_bytes <= HEADROOM * budget else "too big"
            print(f"  try {what}: {fmt_bytes(pred.peak_bytes)} ({verdict})")
    return show


def _advice_text(pred: Prediction, advice: Prediction | None, budget: int, fits: bool) -> str:
    limit = f"{fmt_bytes(budget)} x {HEADROOM:.0%} headroom = {fmt_bytes(HEADROOM * budget)}"
    if fits:
        return f"fits in {limit}."
    if advice is None:
        return (f"does not fit in {limit}, and no setting tried fits: use more ranks (sharding divides "
                f"parameters, gradients and optimizer state), a shorter train.seq_len, or a larger device.")
    return (f"does not fit in {limit}. Cheapest change that fits ({fmt_bytes(advice.peak_bytes)}):\n"
            f"  {' '.join(advice.overrides)}")
