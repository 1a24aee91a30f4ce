"""Optional packages (the pyproject extras) a config or a subcommand needs, checked before any rank starts: a
missing one is one line naming the key and the `pip install` that fixes it, not a traceback from every rank
minutes later. Never imports torch itself."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

from fsdp_ft.config.schema import Config
from fsdp_ft.errors import ConfigError

TRAINING = frozenset({"train", "run", "submit", "submit --tune", "tune"})


@dataclass(frozen=True)
class Need:
    module: str                     # the import name
    extra: str                      # pip install 'fsdp_ft[extra]'
    commands: frozenset             # the subcommands it matters for ("submit --tune" counts as its own)
    asked_by: str = ""              # the config key asking for it; empty: the subcommand itself needs it
    wanted: Optional[Callable[[Config], bool]] = None  # whether the config asks for it
    import_now: bool = True         # False: only look it up (see deepspeed below)


NEEDS = (
    Need("gguf", "gguf", TRAINING | {"plan", "export"}, "config key 'model.gguf_file'",
         lambda cfg: bool(cfg.model.gguf_file)),
    # importing deepspeed picks its accelerator for the whole process (and takes seconds): here it is only looked
    # up; the rank imports it with its settings (runtime/deepspeed_import.py), where a broken install fails
    Need("deepspeed", "deepspeed", TRAINING, "config key 'engine'=deepspeed", lambda cfg: cfg.engine == "deepspeed",
         import_now=False),
    Need("tensorboard", "tracking", TRAINING, "config key 'train.tensorboard'", lambda cfg: cfg.train.tensorboard),
    Need("wandb", "wandb", TRAINING, "config key 'wandb.project'", lambda cfg: bool(cfg.wandb.project)),
    Need("submitit", "slurm", frozenset({"submit", "submit --tune"})),
    Need("optuna", "tune", frozenset({"tune", "submit --tune"})),
)


def import_problem(need: Need) -> Optional[str]:
    """None when the package imports; "" when it is not installed; else what its import raised (a broken
    install)."""
    try:
        if importlib.util.find_spec(need.module) is None:
            return ""
        if need.import_now:
            importlib.import_module(need.module)
    except ModuleNotFoundError as e:
        return "" if e.name == need.module else f"{type(e).__name__}: {e}"
    except Exception as e:  # a broken install raises anything on import
        return f"{type(e).__name__}: {e}"
    return None


def require_extras(cfg: Optional[Config], command: str) -> None:
    """One ConfigError naming every optional package that `command` (with `cfg`) needs and lacks, and the extras
    to install; `cfg` None checks only what the subcommand itself needs."""
    missing, extras = [], []
    for need in NEEDS:
        if command not in need.commands or (need.wanted and (cfg is None or not need.wanted(cfg))):
            continue
        problem = import_problem(need)
        if problem is None:
            continue
        tail = f" (its import failed: {problem.strip().splitlines()[0][:200]})" if problem.strip() else ""
        missing.append(f"{need.asked_by or f'`fsdp-ft {command}`'} needs the {need.module} package{tail}")
        extras.append(need.extra)
    if missing:
        raise ConfigError(f"{'; '.join(missing)}: pip install 'fsdp_ft[{','.join(dict.fromkeys(extras))}]'")


# Optional libraries that transformers or peft import merely because they are installed, and whether a config
# uses them: torchao holds QLoRA's NF4 tensors; bitsandbytes no run uses (QLoRA builds on torchao, see
# fsdp_ft.quant.quantize). A run leaves the unused ones unimported (fsdp_ft.runtime.quiet.hide).
IMPORTED_IF_INSTALLED: dict[str, Callable[[Config], bool]] = {
    "torchao": lambda cfg: cfg.finetune.method == "qlora",
    "bitsandbytes": lambda cfg: False,
}


def unused_libraries(cfg: Config) -> list[str]:
    return [name for name, used in IMPORTED_IF_INSTALLED.items() if not used(cfg)]
