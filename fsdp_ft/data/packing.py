"""Tokenized rows kept compactly, and packing of short rows into rows of train.seq_len with no attention across
samples.

A packed row lists its samples one after another; `position_ids` restart at 0 for each sample and the model is
called without a 2-D attention mask. transformers (>= 4.56, `masking_utils.find_packed_sequence_indices`) then
reads the restarts as sample boundaries and builds a block-diagonal causal mask for sdpa and eager attention (and
flash-attention's variable-length kernel uses the same position ids), so each token sees only its own sample: the
logits equal those of the sample run alone. The first token of each sample carries no label, so no sample is
trained to predict the start of the next one.

Packs are planned once, from the token counts and train.seed alone (best fit in a seeded order), so they are the
same on every rank and after a resume; the batch plan then shuffles packs per epoch like it shuffles rows, and
the data position stays (epoch, step in epoch).
"""
from __future__ import annotations

import bisect
from array import array

import torch


class TokenRows:
    """Token ids and labels of many rows in two flat int32 arrays (4 bytes a token each, not a Python list's 36)."""

    def __init__(self):
        self.ids = array("i")
        self.labels = array("i")
        self.offsets = array("q", [0])

    def append(self, ids: list[int], labels: list[int]) -> None:
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.offsets.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return self.offsets[i + 1] - self.offsets[i]

    def lengths(self) -> list[int]:
        return [self.offsets[i + 1] - self.offsets[i] for i in range(len(self))]

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b].tolist(), self.labels[a:b].tolist()

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        ids, labels = self.tokens(i % len(self))
        return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}

    def select(self, indices) -> TokenRows:
        out = TokenRows()
        for i in indices:
            out.append(*self.tokens(i))
        return out


def plan_packs(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Group row indices into packs of at most `capacity` tokens: rows in a seeded random order, each into the
    fullest open pack it fits (best fit), else a new one. Deterministic for given lengths, capacity and seed."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 7_919 + 17)).tolist()
    packs: list[list[int]] = []
    open_space: list[tuple[int, int]] = []  # (free tokens, pack index), sorted
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"row {i} has {need} tokens, more than the pack size {capacity}")
        k = bisect.bisect_left(open_space, (need, -1))
        if k < len(open_space):
            free, p = open_space.pop(k)
        else:
            free, p = capacity, len(packs)
            packs.append([])
        packs[p].append(i)
        if free - need > 0:
            bisect.insort(open_space, (free - need, p))
    return packs


class PackedRows:
    """Rows made of several tokenized samples each, with position ids restarting per sample."""

    def __init__(self, rows: TokenRows, packs: list[list[int]]):
        self.rows = rows
        self.packs = packs

    @classmethod
    def pack(cls, rows: TokenRows, capacity: int, seed: int) -> PackedRows:
        return cls(rows, plan_packs(rows.lengths(), capacity, seed))

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> dict:
        ids, labels, positions = [], [], []
        for i in self.packs[k]:
            sample_ids, sample_labels = self.rows.tokens(i)
            ids += sample_ids
            labels += [-100] + sample_labels[1:]  # nothing in this sample predicts its first token
            positions += range(len(sample_ids))
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": [1] * len(ids)}

    def fill(self, capacity: int) -> float:
        """Share of the packed rows' token slots that hold tokens (1.0: no padding at all)."""
        return sum(self.rows.lengths()) / max(len(self.packs) * capacity, 1)
