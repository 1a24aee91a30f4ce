"""`fsdp-ft generate`: text from a causal LM with transformers' `generate`, optionally through the chat template.

Each prompt is generated on its own (no padding to reason about) and sampling is re-seeded per prompt, so a
prompt's output does not depend on which other prompts share the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fsdp_ft.errors import ConfigError, DataError
from fsdp_ft.inference.loading import LoadedModel, read_jsonl, text_field


@dataclass
class Sampling:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0 (use --greedy for deterministic output)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError("--top-k must be >= 0 (0: no top-k filtering)")

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False, "num_beams": 1}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def read_prompts(path: str, column: str = "prompt") -> list[str | list[dict]]:
    """A .jsonl file (the `column` of each row: a text, or a list of {role, content} messages for --chat) or a
    text file (one prompt per non-blank line)."""
    if Path(path).suffix.lower() == ".jsonl":
        return [_messages(r[column], path, n) if isinstance(r.get(column), list)
                else text_field(r, column, path, n, "--prompts-file", "--prompt-column")
                for n, r in read_jsonl(path, "--prompts-file")]
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts-file: file '{path}' " + ("is not a file" if p.exists() else "does not exist"))
    from fsdp_ft.data.splits import check_utf8

    check_utf8(p, f"--prompts-file: file '{path}'")
    prompts = [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [t for t in prompts if t.strip()]
    if not prompts:
        raise DataError(f"--prompts-file: file '{path}' has no prompts")
    return prompts


def _messages(value: list, path: str, line: int) -> list[dict]:
    """A conversation given as the prompt (say a system and a user turn), checked so a bad row names its line."""
    ok = value and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in value)
    if not ok:
        raise DataError(f"--prompts-file: '{path}' line {line}: a message list needs {{role, content}} strings")
    return value


def prompt_ids(loaded: LoadedModel, prompt: str | list[dict], chat: bool) -> torch.Tensor:
    """Token ids of one prompt: as a user turn (or, given a message list, that conversation) of the chat template
    ending with the assistant header, or the plain text with the tokenizer's own special tokens."""
    tok = loaded.tokenizer
    if isinstance(prompt, list) and not chat:
        raise ConfigError("--prompts-file holds message lists: add --chat to render them with the chat template")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"--chat: the tokenizer of '{loaded.folder}' has no chat template")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate_texts(loaded: LoadedModel, prompts: list[str], chat: bool, sampling: Sampling) -> list[str]:
    if loaded.task != "causal_lm" or not hasattr(loaded.model, "generate"):
        raise ConfigError(f"generate needs a causal LM; '{loaded.folder}' is a {loaded.task} model "
                          "(use fsdp-ft predict)")
    sampling.check()
    tok, out = loaded.tokenizer, []
    for prompt in prompts:
        ids = prompt_ids(loaded, prompt, chat).to(loaded.device)
        torch.manual_seed(sampling.seed)
        new = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id,
                                    **sampling.generate_kwargs())[0, ids.shape[1]:]
        out.append(tok.decode(new, skip_special_tokens=True))
    return out
