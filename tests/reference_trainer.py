"""An independent trainer for causal-LM fine-tuning, written from the README's promises with plain PyTorch,
transformers and peft; nothing from fsdp_ft is imported on its path.

It is the authority `fsdp-ft train` is checked against in tests/test_reference_trainer.py, so that the
"N ranks equal one process" tests (fsdp_ft against itself) rest on something that is not fsdp_ft. What it
implements, each from the README and the config help rather than from fsdp_ft's code:

- data: `text` rows tokenized with the model's tokenizer (its special tokens, the text, then EOS unless the text
  already ends with it), cut to the first `seq_len` tokens; the order of an epoch is a seeded permutation
  (`torch.randperm` with a generator seeded `seed * 100_003 + epoch`, the data-order contract that resume relies
  on); micro-batch `a` of a step takes rows [a * micro, (a + 1) * micro) of the step's global batch;
- loss: every next-token prediction of a real (non-pad) token counts once; the step's loss is the sum over all its
  micro-batches divided by the step's total count of such tokens (not a mean of micro-batch means);
- AdamW: weight decay on every trainable parameter except biases and normalisation weights;
- clipping: `torch.nn.utils.clip_grad_norm_` of all trainable gradients to `max_grad_norm` (the logged norm is the
  one before clipping);
- schedule: at 0-based step s, lr * (s + 1) / warmup while s < warmup; then with progress
  p = (s - warmup) / (total - warmup): cosine min + (1 - min) * (1 + cos(pi p)) / 2, linear min + (1 - min) (1 - p),
  constant 1;
- dropout: the global torch RNG is seeded with `seed` (rank 0) when training starts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


@dataclass
class Recipe:
    steps: int
    micro: int
    accum: int
    seq_len: int
    lr: float
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    history: list = field(default_factory=list)  # per step: loss, grad_norm, lr


def read_rows(path: Path, column: str = "text") -> list[str]:
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line)[column] for line in fh if line.strip()]
    return [r for r in rows if isinstance(r, str) and r.strip()]


def tokenize(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids[:seq_len])
    return out


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def lr_multiplier(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return (step + 1) / r.warmup
    if r.schedule == "constant":
        return 1.0
    p = min(1.0, (step - r.warmup) / max(1, r.steps - r.warmup))
    shape = (1 + math.cos(math.pi * p)) / 2 if r.schedule == "cosine" else 1 - p
    return r.min_lr_ratio + (1 - r.min_lr_ratio) * shape


def no_decay(model: nn.Module) -> set[int]:
    """Biases and the weights of normalisation layers (by module type name: LayerNorm, RMSNorm, ...)."""
    out = set()
    for module in model.modules():
        norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if norm or name == "bias" or name.endswith("_bias"):
                out.add(id(p))
    return out


def train(model: nn.Module, tokenized: list[list[int]], pad_id: int, r: Recipe) -> Recipe:
    """Train `model` in place for r.steps optimizer steps on one process; fills r.history."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    skip = no_decay(model)
    groups = [{"params": [p for p in trainable if id(p) not in skip], "weight_decay": r.weight_decay},
              {"params": [p for p in trainable if id(p) in skip], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=r.lr, betas=r.betas, eps=r.eps)
    global_batch = r.micro * r.accum
    per_epoch = len(tokenized) // global_batch
    torch.manual_seed(r.seed)
    model.train()
    for step in range(r.steps):
        epoch, in_epoch = divmod(step, per_epoch)
        order = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(r.seed * 100_003 + epoch))
        chosen = order[in_epoch * global_batch:(in_epoch + 1) * global_batch].tolist()
        batches = [pad([tokenized[i] for i in chosen[a * r.micro:(a + 1) * r.micro]], pad_id) for a in range(r.accum)]
        count = sum(int(mask[:, 1:].sum()) for _, mask in batches)
        lr = r.lr * lr_multiplier(step, r)
        for g in optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
            loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum")
            (loss_sum / count).backward()
            total += loss_sum.item()
        if r.max_grad_norm is None:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))
        else:
            norm = torch.nn.utils.clip_grad_norm_(trainable, r.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        r.history.append({"loss": total / count, "grad_norm": float(norm), "lr": lr})
    return r
