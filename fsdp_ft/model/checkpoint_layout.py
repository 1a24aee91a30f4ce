"""Checkpoints whose tensors are laid out differently from the model that loads them.

transformers 5 builds some models in a layout their checkpoints do not use: a mixture-of-experts block holds each
projection of all its experts as one 3-D tensor (`mlp.experts.gate_up_proj`: experts x 2*inner x hidden), while
Mixtral, Qwen-MoE, OLMoE, DeepSeek... checkpoints (and transformers' own `save_pretrained`) keep one matrix per
expert and projection (`block_sparse_moe.experts.3.w1.weight`); older checkpoints also carry renamed keys. Its
`from_pretrained` converts on the way in and back on the way out, by a table per model type (`conversion_mapping`).

fsdp_ft loads each rank's rows itself (`materialize`), so it reads through `model_view`: the same table, applied
by transformers' own conversion operations, a target tensor at a time. Where the rows of the target are the
experts (the stacking comes first), a rank reads only its own experts. `original_layout` does the reverse for
export, so an exported folder has the keys of the checkpoint it came from and loads in any tool that reads that
model type.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from fsdp_ft.errors import ConfigError


def _transforms(hf_model: nn.Module, legacy: bool):
    """transformers' (renamings, converters) for this model; ([], []) where it has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers without conversion tables: checkpoints are in the model's layout
        return [], []
    transforms = get_model_conversion_mapping(hf_model, add_legacy=legacy) or []
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def model_view(source, hf_model: nn.Module, shapes: dict[str, tuple]):
    """`source` (a weight source: keys, __contains__, read_rows, shape, close) as the model's tensors, `shapes`
    (checkpoint-style name: full shape); `source` itself where the checkpoint's keys need no conversion."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = _transforms(hf_model, legacy=True)
    if not renamings and not converters:
        return source
    wanted = dict.fromkeys(shapes, True)  # rename_source_key tests membership with .get()
    prefix = getattr(hf_model, "base_model_prefix", "") or None
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    renamed: dict[str, str] = {}
    grouped: dict[str, tuple] = {}
    for key in sorted(source.keys(), key=dot_natural_key):  # experts in index order, as transformers stacks them
        if key in wanted:
            continue
        target, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
        if target not in wanted:
            continue
        if pattern is None:
            renamed[target] = key
        else:
            grouped.setdefault(target, (by_pattern[pattern], []))[1].append((pattern, key))
    if not renamed and not grouped:
        return source
    return ConvertedSource(source, hf_model, renamed, grouped, shapes)


class ConvertedSource:
    """A weight source in the model's layout over one in the checkpoint's (`model_view`)."""

    def __init__(self, source, hf_model: nn.Module, renamed: dict[str, str], grouped: dict[str, tuple],
                 shapes: dict[str, tuple]):
        self.source, self.hf_model = source, hf_model
        self.renamed, self.grouped, self.shapes = renamed, grouped, shapes
        self._spare: dict[str, torch.Tensor] = {}  # one-to-many conversions: the targets not asked for yet

    def keys(self):
        return [*self.source.keys(), *self.renamed, *self.grouped]

    def __contains__(self, name) -> bool:
        return name in self.renamed or name in self.grouped or name in self.source

    def shape(self, name):
        if name in self.renamed:
            return self.source.shape(self.renamed[name])
        if name in self.grouped:
            return self.shapes[name]
        return self.source.shape(name)

    def close(self):
        self._spare = {}
        self.source.close()

    def read_rows(self, name, start, stop):
        if name in self.renamed:
            return self.source.read_rows(self.renamed[name], start, stop)
        if name not in self.grouped:
            return self.source.read_rows(name, start, stop)
        whole = self._spare.pop(name, None)
        if whole is None:
            converter, members = self.grouped[name]
            if _rows_are_experts(converter) and (start, stop) != (0, self.shapes[name][0]):
                return self._convert(name, converter, members, start, stop)
            whole = self._convert(name, converter, members, 0, None)
        return whole if whole.dim() == 0 else whole[start:stop]

    def _convert(self, name: str, converter, members: list[tuple[str, str]], start: int, stop: int | None):
        """Target `name` (rows start..stop of it where they are experts, else whole) from its checkpoint tensors,
        through transformers' own operations."""
        converter = copy.deepcopy(converter)
        position: dict[str, int] = {}
        for pattern, key in members:
            index = position[pattern] = position.get(pattern, -1) + 1  # the expert's place in the stack
            if stop is not None and not start <= index < stop:
                continue
            converter.add_tensor(name, key, pattern, lambda k=key: self.source.read_rows(k, 0, self.source.shape(k)[0]))
        try:
            out = converter.convert(name, model=self.hf_model, config=self.hf_model.config)
        except Exception as e:
            raise ConfigError(f"config key 'model.path': cannot convert the checkpoint's {members[0][1]} (and the "
                              f"rest of {name}) into this model's layout: {e}") from None
        out = {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}
        mine = out.pop(name, None)
        if stop is None:
            self._spare.update(out)
        want = self.shapes[name] if stop is None else (stop - start, *self.shapes[name][1:])
        if mine is None or tuple(mine.shape) != tuple(want):
            got = "nothing" if mine is None else f"shape {tuple(mine.shape)}"
            raise ConfigError(f"config key 'model.path': converting the checkpoint's {members[0][1]} for {name} "
                              f"gave {got}, the model needs {tuple(want)}")
        return mine


def _rows_are_experts(converter) -> bool:
    """The converter stacks one tensor per expert along dim 0 first and later only joins or swaps other dims, so
    rows i..j of the target are experts i..j."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    ops = converter.operations
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return False
    for op in ops[1:]:
        if type(op) is Concatenate and op.dim != 0:
            continue
        if type(op) is Transpose and 0 not in (op.dim0, op.dim1):
            continue
        return False
    return True


def original_layout(named_tensors: Iterable[tuple[str, torch.Tensor]], hf_model: nn.Module
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Model-layout (name, tensor) pairs as the model type's checkpoints name and shape them (what transformers'
    save_pretrained writes). Converted a block at a time: every conversion joins or splits tensors of one layer,
    and a block's tensors come together in the stream."""
    renamings, converters = _transforms(hf_model, legacy=False)
    if not renamings and not converters:
        yield from named_tensors
        return
    from transformers.core_model_loading import revert_weight_conversion

    block, pending = None, {}
    for name, tensor in named_tensors:
        here = _block_of(name)
        if pending and here != block:
            yield from revert_weight_conversion(hf_model, pending).items()
            pending = {}
        block = here
        pending[name] = tensor
    if pending:
        yield from revert_weight_conversion(hf_model, pending).items()


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def _block_of(name: str) -> str:
    """The name up to its first numbered module (`model.layers.3`), or the name itself outside any stack."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name
