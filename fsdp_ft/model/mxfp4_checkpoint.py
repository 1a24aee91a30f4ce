"""Checkpoints whose expert stacks are stored in MXFP4 (gpt-oss as OpenAI publishes it), read as plain weights.

The hub's gpt-oss folders keep each expert stack as `<name>_blocks` (uint8, experts x outputs x groups x 16: two
4-bit E2M1 codes a byte, 32 values a group) and `<name>_scales` (uint8 powers of two, one a group, biased by 127),
and say so in config.json's `quantization_config`. Training needs the values: the model is built plain (the
config's MXFP4 entry is dropped in `model.build`), and this view serves `<name>` in the model's layout
(experts x inputs x outputs), decoded by transformers' own `convert_moe_packed_tensors`. Every MXFP4 value is
exact in bf16 and fp32. Rows of the stack are experts, so where FSDP shards the stack by experts (full, LoRA) a
rank decodes only its own; QLoRA reads the stack whole and stores it in 4 bits again (NF4, the format its LoRA
trains on). An export writes plain weights without the MXFP4 entry, which any tool loads.
"""
from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
QUANT_METHOD = "mxfp4"


def view(source):
    """`source` (a weight source) with each MXFP4 pair served as the plain stack it encodes; `source` itself
    when it holds none."""
    pairs = {k[:-len(BLOCKS)]: k for k in source.keys()
             if k.endswith(BLOCKS) and k[:-len(BLOCKS)] + SCALES in source}
    return Mxfp4Source(source, pairs) if pairs else source


class Mxfp4Source:
    """A weight source that decodes MXFP4 stacks (`view`) and passes every other tensor through."""

    def __init__(self, source, pairs: dict[str, str]):
        self.source, self.pairs = source, pairs
        self._hidden = {*pairs.values(), *(name + SCALES for name in pairs)}

    def keys(self):
        return [*(k for k in self.source.keys() if k not in self._hidden), *self.pairs]

    def __contains__(self, name) -> bool:
        return name in self.pairs or (name in self.source and name not in self._hidden)

    def shape(self, name):
        if name not in self.pairs:
            return self.source.shape(name)
        experts, outputs, groups, pair_bytes = self.source.shape(self.pairs[name])
        return experts, groups * pair_bytes * 2, outputs

    def read_rows(self, name, start, stop):
        if name not in self.pairs:
            return self.source.read_rows(name, start, stop)
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        blocks = self.source.read_rows(self.pairs[name], start, stop)
        scales = self.source.read_rows(name + SCALES, start, stop)
        return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)

    def close(self):
        self.source.close()


def drop_quantization_config(hf_config) -> None:
    """Remove config.json's MXFP4 entry: the weights are decoded on load, and the model is a plain one."""
    q = getattr(hf_config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == QUANT_METHOD:
        del hf_config.quantization_config
