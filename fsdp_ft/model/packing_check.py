"""Whether a model keeps packed samples apart (data.packing), checked before any weight exists.

A packed row is run with position ids that restart at each sample and no attention mask; transformers turns the
restarts into a block-diagonal mask only where the model hands `position_ids` to its mask functions
(`masking_utils.create_causal_mask` and kin). Some models do not (gpt-oss, OPT, BLOOM, MPT in transformers 5.25):
there every token would attend to the samples packed before it, and the run would train on that without a word.
So the meta model runs a forward on a packed row, and the first mask function it calls says what it was given;
the forward stops there.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from fsdp_ft.errors import ConfigError


class _MaskCall(Exception):
    def __init__(self, got_positions: bool):
        super().__init__()
        self.got_positions = got_positions


def check(model: nn.Module) -> None:
    """Raise a one-line error when `model` (on the meta device, attention not flash: flash kernels read the
    position ids themselves) builds its attention mask without the packed position ids."""
    if _reads_packed_positions(model) is False:
        name = type(model).__name__
        raise ConfigError(f"config key 'data.packing': {name} builds its attention mask without position ids in "
                          "this transformers version, so packed samples would attend to each other; set "
                          "data.packing=false")


def _reads_packed_positions(model: nn.Module) -> bool | None:
    """True or False from the first mask function the forward calls; None when it calls none of transformers'."""
    from transformers import masking_utils

    spied = []
    for module in {sys.modules[type(m).__module__] for m in model.modules()}:
        for attr, fn in vars(module).items():
            if getattr(fn, "__module__", None) == masking_utils.__name__ and attr.startswith("create_") \
                    and attr.endswith("mask") and callable(fn):
                spied.append((module, attr, fn))
                setattr(module, attr, _spy(fn))
    ids = torch.zeros((1, 4), dtype=torch.long, device="meta")
    try:
        model(input_ids=ids, position_ids=ids.clone(), use_cache=False)
    except _MaskCall as call:
        return call.got_positions
    except Exception:  # the meta forward failed before any mask function: nothing to tell
        return None
    finally:
        for module, attr, fn in spied:
            setattr(module, attr, fn)
    return None


def _spy(fn):
    signature = inspect.signature(fn)

    def spy(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        raise _MaskCall(bound.get("position_ids") is not None)

    return spy
