"""Preference pairs (DPO, ORPO, reward models): check rows, render, tokenize, truncate, batch.

A row is either three strings (prompt, chosen, rejected) or two chat message lists (chosen, rejected) that
share every turn but the last assistant turn, optionally after shared turns in the prompt column. Chat rows
are rendered with the tokenizer's chat template: the prompt is rendered with the generation prompt, and the
response is what the full conversation adds after it.

Token layout of each side: prompt tokens (string prompts get the tokenizer's special tokens, e.g. BOS), then
response tokens (string responses end with EOS; chat responses end with the template's end-of-turn). Only
response tokens carry loss.

Truncation to train.seq_len keeps the responses and cuts the prompt from the left (the turns nearest the
answer survive); chosen and rejected keep the same prompt tokens, so the pair is still compared in the same
context. A response longer than seq_len - 1 tokens loses its end (one prompt token stays, so the first
response token is predicted from something).

Batches hold chosen rows first, then rejected rows, padded to one width: one forward scores both sides.
"""
from __future__ import annotations

import torch

from fsdp_ft.config import Config
from fsdp_ft.errors import DataError
from fsdp_ft.tasks.causal_lm import IGNORE, pad_batch

ROLES = ("system", "user", "assistant")


class PairData:
    """Row checks and encoding shared by every preference task."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer
        p = cfg.preference
        self.prompt_col, self.chosen_col, self.rejected_col = p.prompt_column, p.chosen_column, p.rejected_column

    def columns(self) -> list[str]:
        """Required columns; the prompt column is required for string rows only (see check_rows)."""
        return [self.chosen_col, self.rejected_col]

    # ------------------------------------------------------------ validation (before the model is built)

    def check_rows(self, table, source: str) -> None:
        """Fail on the first bad row, naming `source` (file) and the 1-based row number."""
        has_prompt = self.prompt_col in table.column_names
        for i, row in enumerate(table):
            problem = self._row_problem(row, has_prompt)
            if problem:
                raise DataError(f"{source} row {i + 1}: {problem}")

    def _row_problem(self, row: dict, has_prompt: bool) -> str | None:
        chosen, rejected = row[self.chosen_col], row[self.rejected_col]
        prompt = row.get(self.prompt_col) if has_prompt else None
        for col, value in ((self.chosen_col, chosen), (self.rejected_col, rejected)):
            if _is_empty(value):
                return f"column '{col}' is empty"
        if isinstance(chosen, str) and isinstance(rejected, str):
            if not has_prompt:
                return (f"chosen/rejected are strings, so a prompt column '{self.prompt_col}' is needed; "
                        "set preference.prompt_column, or give chat message lists")
            if not isinstance(prompt, str):
                return f"column '{self.prompt_col}' must be a string when chosen/rejected are strings"
            return None
        if isinstance(chosen, list) and isinstance(rejected, list):
            return self._chat_problem(prompt, chosen, rejected)
        return (f"columns '{self.chosen_col}' and '{self.rejected_col}' must both be strings or both chat message "
                f"lists, got {type(chosen).__name__} and {type(rejected).__name__}")

    def _chat_problem(self, prompt, chosen: list, rejected: list) -> str | None:
        if prompt is not None and not isinstance(prompt, list):
            return f"column '{self.prompt_col}' must be a chat message list (or empty) when chosen/rejected are lists"
        for col, messages in ((self.prompt_col, prompt or []), (self.chosen_col, chosen),
                              (self.rejected_col, rejected)):
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    return f"column '{col}' message {k + 1} is not a {{role, content}} object with text content"
                if m.get("role") not in ROLES:
                    return f"column '{col}' message {k + 1} has unknown role {m.get('role')!r} (known: {list(ROLES)})"
        for col, messages in ((self.chosen_col, chosen), (self.rejected_col, rejected)):
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                return f"column '{col}' must end with a non-empty assistant message"
        if _turns(chosen[:-1]) != _turns(rejected[:-1]):
            return (f"columns '{self.chosen_col}' and '{self.rejected_col}' must share every turn but the last "
                    "assistant message")
        if not getattr(self.tok, "chat_template", None):
            return "chat message lists need a tokenizer with a chat template; this one has none"
        try:
            self._render_chat(prompt or [], chosen)
        except ValueError as e:
            return str(e)
        return None

    # ------------------------------------------------------------ encoding

    def texts(self, row: dict) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, whether the texts come from a chat template)."""
        chosen, rejected = row[self.chosen_col], row[self.rejected_col]
        if isinstance(chosen, str):
            return row[self.prompt_col], chosen, rejected, False
        shared = list(row.get(self.prompt_col) or [])
        prompt_text, chosen_text = self._render_chat(shared, chosen)
        _, rejected_text = self._render_chat(shared, rejected)
        return prompt_text, chosen_text, rejected_text, True

    def _render_chat(self, shared: list, messages: list) -> tuple[str, str]:
        """The rendered prompt (with the generation prompt) and the text the final assistant turn adds to it."""
        turns = [{"role": m["role"], "content": m["content"]} for m in shared + messages]
        prompt = self.tok.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
        full = self.tok.apply_chat_template(turns, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as the start of the conversation, so the "
                             "response cannot be told apart; give prompt/chosen/rejected strings instead")
        return prompt, full[len(prompt):]

    def tokens(self, row: dict) -> tuple[list[int], list[int], list[int]]:
        prompt, chosen, rejected, chat = self.texts(row)
        if chat:  # the template already holds any BOS and the end-of-turn markers
            prompt_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            return (prompt_ids, self.tok(chosen, add_special_tokens=False)["input_ids"],
                    self.tok(rejected, add_special_tokens=False)["input_ids"])
        return (self.tok(prompt, add_special_tokens=True)["input_ids"], self._response(chosen),
                self._response(rejected))

    def _response(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        eos = self.tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        return ids

    def encode(self, row: dict) -> dict:
        prompt, chosen, rejected = fit_to_length(*self.tokens(row), self.cfg.train.seq_len)
        out = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            out[f"{side}_input_ids"] = prompt + response
            out[f"{side}_labels"] = [IGNORE] * len(prompt) + response
        return out

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Chosen rows first, then rejected rows, right-padded to one width."""
        seqs = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"],
                 "attention_mask": [1] * len(r[f"{side}_input_ids"])}
                for side in ("chosen", "rejected") for r in rows]
        return pad_batch(seqs, self.tok.pad_token_id, ("input_ids", "labels", "attention_mask"))


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def _turns(messages: list) -> list[tuple]:
    return [(m["role"], m["content"]) for m in messages]


def fit_to_length(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int):
    """Keep the responses, cut the shared prompt from the left; cut a response's end only when it alone is
    too long (leaving one prompt token, when there is a prompt, to predict its first token from)."""
    limit = seq_len - 1 if prompt and seq_len > 1 else seq_len
    chosen, rejected = chosen[:limit], rejected[:limit]
    room = seq_len - max(len(chosen), len(rejected))
    return prompt[max(len(prompt) - room, 0):], chosen, rejected


def pair_count(batch: dict) -> torch.Tensor:
    """Pairs in a batch (half its rows), made on the batch's device: a host-made count would be copied to the GPU
    with a wait for the stream every step."""
    ids = batch["input_ids"]
    return torch.full((), ids.shape[0] // 2, dtype=torch.long, device=ids.device)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log-probabilities of its labelled (response) tokens, and how many there are."""
    logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual-token positions
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE,
                                            reduction="none")
    return -nll.sum(-1), (shift_labels != IGNORE).sum(-1)


def pair_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Means per pair of the summed loss, rewards and chosen-over-rejected wins (ties count as losses)."""
    n = max(sums["count"], 1)
    return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n,
            "reward_margin": (sums["chosen_reward"] - sums["rejected_reward"]) / n,
            "chosen_reward": sums["chosen_reward"] / n, "rejected_reward": sums["rejected_reward"] / n}


PAIR_METRICS = ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward")


class PairTask:
    """What DPO, ORPO and reward modelling share: pair rows in, concatenated batches out, sums per pair."""
    count_unit = "pairs"
    eval_metrics = PAIR_METRICS

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer
        self.data = PairData(cfg, tokenizer)

    def columns(self) -> list[str]:
        return self.data.columns()

    def check_rows(self, table, source: str) -> None:
        self.data.check_rows(table, source)

    def labels(self, table) -> list[str] | None:
        return None

    def encode(self, row: dict) -> dict:
        return self.data.encode(row)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.data.collate(rows)

    def count(self, batch: dict) -> torch.Tensor:
        return pair_count(batch)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return pair_metrics(sums)
