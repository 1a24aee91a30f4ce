"""The global batch: train.global_batch_size fixes samples per optimizer step, and train.grad_accum follows from
the ranks at hand, so a config written for 8 GPUs optimises alike on one.

Every rank of the job is a data-parallel rank: FSDP (hybrid replicas too) and DeepSpeed ZeRO give each rank its
own micro-batches; there is no tensor or pipeline dimension that would share one."""
from __future__ import annotations

import dataclasses

from fsdp_ft.config.schema import Config
from fsdp_ft.errors import ConfigError


def resolve(cfg: Config, ranks: int) -> Config:
    """`cfg` with train.grad_accum an int for `ranks` data-parallel ranks: derived from train.global_batch_size
    when that is set (one-line refusal when it does not divide, or when grad_accum says otherwise), else 1 when
    null."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg if t.grad_accum is not None else _with_accum(cfg, 1)
    per_micro_step = t.micro_batch_size * ranks
    accum, rest = divmod(t.global_batch_size, per_micro_step)
    shape = (f"train.micro_batch_size={t.micro_batch_size} x {ranks} rank{'s' if ranks > 1 else ''} "
             f"= {per_micro_step}")
    if rest or accum == 0:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"{shape}: use train.global_batch_size={_near(t.global_batch_size, per_micro_step)}"
                          f"{_micro_hint(t.global_batch_size, ranks)}")
    if t.grad_accum is not None and t.grad_accum != accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} and train.global_batch_size="
                          f"{t.global_batch_size} disagree: {t.global_batch_size} / ({shape}) is {accum}; set "
                          f"train.grad_accum=null (derived) or drop train.global_batch_size")
    return _with_accum(cfg, accum)


def portable(cfg: Config) -> Config:
    """What config.yaml records: with train.global_batch_size set, train.grad_accum stays null (derived), so the
    file trains alike on any number of ranks, a resume on another rank count included."""
    return _with_accum(cfg, None) if cfg.train.global_batch_size is not None else cfg


def describe(cfg: Config, ranks: int) -> dict:
    """The set-up row's `batch` entry of a resolved config."""
    t = cfg.train
    return {"global": t.micro_batch_size * t.grad_accum * ranks, "micro": t.micro_batch_size,
            "accum": t.grad_accum, "ranks": ranks,
            "from": "train.global_batch_size" if t.global_batch_size is not None else "train.grad_accum"}


def _with_accum(cfg: Config, accum: int | None) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))


def _near(total: int, step: int) -> str:
    below, above = total // step * step, (total // step + 1) * step
    return f"{below} or {above}" if below else str(above)


def _micro_hint(total: int, ranks: int) -> str:
    """Micro-batch sizes that divide the global batch on these ranks (a few, smallest first)."""
    if total % ranks:
        return ""
    sizes = [m for m in range(1, total // ranks + 1) if total % (m * ranks) == 0][:6]
    return f", or train.micro_batch_size in {{{', '.join(map(str, sizes))}}}"
