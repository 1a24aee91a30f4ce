"""Quiet by default, loud on request: the CLI's own processes (the launcher and every rank) keep known-harmless
third-party noise off the console, so a new user sees only the lines that matter; `-v` (FSDP_FT_VERBOSE=1, which
ranks and trials inherit) shows everything.

Two kinds of noise, neither of them ours nor an error:
- optional libraries imported only because they are installed: transformers imports torchao whenever it is there
  (for its torchao quantizer), peft imports bitsandbytes; each prints warnings on import on every rank (kernels
  built for other GPUs, deprecations) and costs seconds. `hide` makes them look not installed to a run that does
  not use them: None in sys.modules, so `importlib.util.find_spec` answers None and an import raises ImportError,
  which is how both libraries check;
- warnings that say nothing to a user, each matched by its logger or category and its message, not silenced
  wholesale.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "FSDP_FT_VERBOSE"

# (logger, part of the message): warnings of third-party loggers that change nothing for the run
LOG_NOISE = (
    ("torchao", "Failed to load "),  # compiled kernels for other GPUs or Python ABIs; the run does not call them
    ("torch.utils._pytree", "register_constant() on Enum subclasses is deprecated"),  # torchao's enums, at import
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),  # hub kernel
)
# (category, message regex, module regex) for warnings.filterwarnings
WARNING_NOISE = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\."),  # peft reads the old name
    # peft gives a fused gate_up_proj twice the rank by a pattern of its own, and warns where the model (an MoE:
    # its gate_up_proj is an expert tensor, adapted by target_parameters or not at all) has no such linear layer
    (RuntimeWarning, r"The following (rank|alpha)_pattern keys did not match any targeted module", r"peft\."),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """`-v`: for this process and, through the environment, the ranks and trials it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


class _DropMessages(logging.Filter):
    def __init__(self, parts: list[str]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def install() -> None:
    """Filter the known-harmless warnings in this process, unless verbose. Idempotent."""
    if verbose():
        return
    by_logger: dict[str, list[str]] = {}
    for name, part in LOG_NOISE:
        by_logger.setdefault(name, []).append(part)
    for name, parts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(parts))
    for category, message, module in WARNING_NOISE:
        warnings.filterwarnings("ignore", message, category, module)


def hide(libraries: list[str]) -> None:
    """Make optional `libraries` that this process's run does not use look not installed (see the module's
    docstring), unless verbose; one already imported stays as it is."""
    if verbose():
        return
    for name in libraries:
        if name not in sys.modules:
            sys.modules[name] = None
