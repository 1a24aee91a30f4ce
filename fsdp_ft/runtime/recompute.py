"""Large tensors that backward recomputes instead of keeping: a saved-tensor policy narrower than checkpointing.

Activation checkpointing drops everything a block saved and reruns its forward. Some tensors are much larger
than the rest and cheap to remake from what autograd keeps anyway: the LoRA fold `W + s * B @ A` of a whole
expert stack is one such (see `fsdp_ft.model.lora_folds`). A tensor `mark`ed with the recipe that made it is, while
`dropping_marked()` is open, saved for backward as that recipe and its view geometry; backward remakes it once,
serves every saved view of it from that one copy, and frees it when the last one is used. Every other saved tensor
is kept as autograd would keep it.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

RECIPE_ATTR = "fsdp_ft_recipe"  # on a marked tensor: its `_Recipe`


class _Recipe:
    """How to remake a marked tensor, and the one remade copy while saved views of it wait for backward."""

    def __init__(self, remake: Callable[[], torch.Tensor], like: torch.Tensor):
        self.remake = remake
        self.size, self.stride, self.offset = like.size(), like.stride(), like.storage_offset()
        self.pending = 0
        self.copy: torch.Tensor | None = None

    def view(self, size, stride, offset) -> torch.Tensor:
        if self.copy is None:
            with torch.no_grad():
                fresh = self.remake()
            if fresh.stride() != self.stride:
                fresh = torch.empty_strided(self.size, self.stride, dtype=fresh.dtype,
                                            device=fresh.device).copy_(fresh)
            self.copy = fresh
        out = self.copy.as_strided(size, stride, self.copy.storage_offset() + offset - self.offset)
        self.pending -= 1
        if self.pending <= 0:
            self.copy = None  # the last saved view: the remade tensor lives on only in `out`
        return out


def mark(t: torch.Tensor, remake: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Have backward remake `t` (and any view of it) with `remake()` instead of keeping it. `remake` must give the
    same values from tensors that live until backward anyway (weights, small factors), never from `t`."""
    setattr(t, RECIPE_ATTR, _Recipe(remake, t))
    return t


def _pack(t: torch.Tensor):
    root = t if t._base is None else t._base
    recipe = getattr(root, RECIPE_ATTR, None)
    if recipe is None:
        return t
    recipe.pending += 1
    return recipe, t.size(), t.stride(), t.storage_offset()


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, size, stride, offset = packed
    return recipe.view(size, stride, offset)


@contextmanager
def dropping_marked():
    """While open, tensors saved for backward that are `mark`ed (or views of one) are kept as their recipe."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
